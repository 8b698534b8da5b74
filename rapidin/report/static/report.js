(function(){
'use strict';
var POS=[230,97,1],NEG=[33,102,172],KINDS=['influential','helpful','harmful'];
var payload=JSON.parse(document.getElementById('rapidin-data').textContent);
var texts=payload.texts,att=payload.attribution;
function field(h,f){return h[f]!==undefined?h[f]:(texts[String(h.row)]||{})[f];}
function colour(v,s){
  if(v===null||v===undefined||!isFinite(v)||!(s>0))return['transparent','inherit'];
  var t=Math.min(1,Math.abs(v)/s),e=v>=0?POS:NEG,c=e.map(function(x){return Math.round(255+(x-255)*t);});
  return['rgb('+c.join(',')+')',t>0.6?'#fff':'#111'];
}
function fmt(v){
  if(v===null||v===undefined||!isFinite(v))return'n/a';
  var s=Number(v.toPrecision(4)),a=Math.abs(s),txt;
  if(a!==0&&(a<1e-4||a>=1e4)){txt=s.toExponential(3).replace(/\.?0+e/,'e').replace(/e([+-])(\d)$/,function(m,sg,d){return'e'+sg+'0'+d;});}
  else{txt=String(s);}
  return(s>=0?'+':'')+txt;
}
function scaleOf(vals){var m=0;vals.forEach(function(v){if(v!==null&&v!==undefined&&isFinite(v))m=Math.max(m,Math.abs(v));});return m;}
function viewValues(gen,view){
  var n=gen.tokens.length,out=new Array(n).fill(null),p=view.split(':');
  if(p[0]==='row'){var sc=gen[p[1]][+p[2]].token_scores||[];for(var j=0;j<n;j++)out[j]=j<sc.length?sc[j]:null;return out;}
  if(p[0]==='pt'){(gen.per_token||[]).forEach(function(t){var l=t[p[1]];if(t.position<n&&l.length)out[t.position]=l[0].score;});return out;}
  var kinds={'net':['helpful','harmful'],'sum':[p[1]]}[p[0]],seen={};
  kinds.forEach(function(k){gen[k].forEach(function(h){
    if(seen[h.row]||!h.token_scores)return;seen[h.row]=1;
    h.token_scores.slice(0,n).forEach(function(v,j){out[j]=(out[j]||0)+v;});});});
  return out;
}
function paint(el,v,s){
  var c=colour(v,s);el.style.background=c[0];el.style.color=c[1];
  el.classList.toggle('neg',v!==null&&isFinite(v)&&v<0&&s>0&&Math.abs(v)/s>0.05);
  el.title=JSON.stringify(el.dataset.token||el.textContent)+': '+fmt(v);
}
function driversOf(gen,pos){
  var t=(gen.per_token||[]).filter(function(x){return x.position===pos;})[0];
  if(t)return{source:'per-token top-k',helpful:t.helpful,harmful:t.harmful};
  var rows=[],seen={};
  KINDS.forEach(function(k){gen[k].forEach(function(h){if(h.token_scores&&!seen[h.row]){seen[h.row]=1;
    rows.push({row:h.row,rank:0,score:h.token_scores[pos],id:h.id,response:h.response});}});});
  var pos_=rows.filter(function(r){return r.score>0;}).sort(function(a,b){return b.score-a.score;}).slice(0,10);
  var neg_=rows.filter(function(r){return r.score<0;}).sort(function(a,b){return a.score-b.score;}).slice(0,10);
  pos_.forEach(function(r,i){r.rank=i+1;});neg_.forEach(function(r,i){r.rank=i+1;});
  return{source:'token scores of the listed rows',helpful:pos_,harmful:neg_};
}
function el(tag,cls,text){var e=document.createElement(tag);if(cls)e.className=cls;if(text!==undefined)e.textContent=text;return e;}
function setup(sec){
  var g=+sec.dataset.gen,gen=att.generations[g],toks=sec.querySelectorAll('.tok'),panel=sec.querySelector('.token-panel');
  toks.forEach(function(t,j){t.dataset.token=gen.tokens[j];});
  var sel=sec.querySelector('.view-select'),selected=null;
  function applyView(view){
    sec.dataset.view=view;if(sel&&sel.value!==view)sel.value=view;
    var vals=viewValues(gen,view),s=scaleOf(vals);
    toks.forEach(function(t,j){paint(t,vals[j],s);});
    var sn=sec.querySelector('.controls .scale');if(sn)sn.textContent=fmt(s).slice(1);
  }
  if(sel){sel.addEventListener('change',function(){applyView(sel.value);});applyView(sel.value);}
  function showTab(kind){
    sec.querySelectorAll('.tab').forEach(function(b){b.setAttribute('aria-selected',String(b.dataset.kind===kind));});
    sec.querySelectorAll('.list').forEach(function(l){l.hidden=l.dataset.kind!==kind;});
  }
  sec.querySelectorAll('.tab').forEach(function(b){b.addEventListener('click',function(){showTab(b.dataset.kind);});});
  var only=sec.querySelector('.only-driving');
  only.addEventListener('change',function(){sec.querySelectorAll('.list').forEach(function(l){l.classList.toggle('only',only.checked&&selected!==null);});});
  sec.querySelectorAll('.use-view').forEach(function(b){b.addEventListener('click',function(){applyView(b.dataset.view);
    sec.querySelector('.tokens').scrollIntoView({block:'nearest'});});});
  function clear(){
    selected=null;toks.forEach(function(t){t.classList.remove('selected');t.removeAttribute('aria-pressed');});
    sec.querySelectorAll('.hit.drives').forEach(function(h){h.classList.remove('drives');var b=h.querySelector('.badge');b.hidden=true;b.textContent='';});
    sec.querySelectorAll('.list').forEach(function(l){l.classList.remove('only');});
    panel.hidden=true;panel.textContent='';sec.dataset.selected='';
  }
  function select(pos){
    if(selected===pos){clear();return;}
    clear();selected=pos;sec.dataset.selected=String(pos);
    var t=toks[pos];t.classList.add('selected');t.setAttribute('aria-pressed','true');
    var d=driversOf(gen,pos),marks={};
    ['helpful','harmful'].forEach(function(k){d[k].forEach(function(h){(marks[h.row]=marks[h.row]||[]).push(k+' #'+h.rank+' '+fmt(h.score));});});
    sec.querySelectorAll('.hit').forEach(function(h){var m=marks[h.dataset.row];if(m){h.classList.add('drives');
      var b=h.querySelector('.badge');b.hidden=false;b.textContent='drives this token: '+m.join(', ');}});
    sec.querySelectorAll('.list').forEach(function(l){l.classList.toggle('only',only.checked);});
    panel.textContent='';
    var head=el('h3',null,'Token '+JSON.stringify(gen.tokens[pos])+' at position '+pos+': rows that drove it ('+d.source+')');
    var close=el('button','clear','clear selection');close.type='button';close.addEventListener('click',clear);
    head.appendChild(document.createTextNode(' '));head.appendChild(close);panel.appendChild(head);
    var cols=el('div','cols');
    ['helpful','harmful'].forEach(function(k){
      var col=el('div','col');col.dataset.kind=k;col.appendChild(el('strong',null,k==='helpful'?'Raised it (helpful)':'Lowered it (harmful)'));
      var ol=el('ol','drivers');
      d[k].forEach(function(h){
        var li=el('li',null);li.dataset.row=h.row;li.dataset.score=h.score;
        var sc=el('span','score',fmt(h.score)),c=colour(h.score,scaleOf(d[k].map(function(x){return x.score;})));
        sc.style.background=c[0];sc.style.color=c[1];li.appendChild(sc);
        var resp=String(field(h,'response')||'').replace(/\s+/g,' ');
        li.appendChild(document.createTextNode(' row '+h.row+' \u00b7 '+(resp.length>90?resp.slice(0,89)+'\u2026':resp)));
        li.title='id '+field(h,'id');
        li.addEventListener('click',function(){
          var card=sec.querySelector('.list:not([hidden]) .hit[data-row="'+h.row+'"]')||sec.querySelector('.hit[data-row="'+h.row+'"]');
          if(card){showTab(card.dataset.kind);card.scrollIntoView({block:'center'});}
        });
        ol.appendChild(li);
      });
      if(!d[k].length)ol.appendChild(el('li',null,'none'));
      col.appendChild(ol);cols.appendChild(col);
    });
    panel.appendChild(cols);panel.hidden=false;
  }
  toks.forEach(function(t,j){
    t.addEventListener('click',function(){select(j);});
    t.addEventListener('keydown',function(e){if(e.key==='Enter'||e.key===' '){e.preventDefault();select(j);}
      if(e.key==='Escape')clear();
      if(e.key==='ArrowRight'&&toks[j+1])toks[j+1].focus();if(e.key==='ArrowLeft'&&toks[j-1])toks[j-1].focus();});
  });
}
document.querySelectorAll('section.gen').forEach(setup);
document.documentElement.dataset.ready='1';
})();
