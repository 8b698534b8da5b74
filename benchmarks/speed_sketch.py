"""Speed benchmark, RapidGrad: the composed gather against the paper's round-by-round shuffles."""

from __future__ import annotations

import time

from speed_common import log, median, table


def rounds_hoisted(steps, signs, spec, vector):
    """apply_by_rounds with its shuffle tables computed once (isolates the data movement)."""
    import torch

    vec = torch.nn.functional.pad(vector.to(torch.float32), (0, spec.padded_d - spec.d))
    for axis, size, index in steps:
        vec = vec.reshape(size, -1)[index, :] if axis == "rows" else vec.reshape(-1, size)[:, index]
        vec = vec.reshape(-1)
    return (vec * signs).reshape(spec.config.k, spec.block).sum(-1)


def rapidgrad_section(args) -> list[dict]:
    import torch
    from rapidin.config import SketchConfig
    from rapidin.sketch import RapidGrad, apply_by_rounds, make_spec

    out = []
    for d in [int(float(x)) for x in args.build_dims.split(",")]:
        spec = make_spec(SketchConfig(k=args.k, lam=args.lam), d)
        steps_t, signs_t, perm_t = [], [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            spec.shuffle_steps()
            t1 = time.perf_counter()
            spec.signs()
            t2 = time.perf_counter()
            spec.permutation("cpu")
            t3 = time.perf_counter()
            steps_t.append(t1 - t0)
            signs_t.append(t2 - t1)
            perm_t.append(t3 - t2)
        sketch = RapidGrad(spec, "cpu")
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(args.apply_batch, d, generator=gen)
        composed_t = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            y = sketch(x)
            composed_t.append(time.perf_counter() - t0)
        n_rounds = min(args.apply_batch, 2)
        rounds_t, hoisted_t = [], []
        steps = [(a, s, torch.from_numpy(p)) for a, s, p in spec.shuffle_steps()]
        signs = torch.from_numpy(spec.signs())
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            ref = [apply_by_rounds(spec, x[i]) for i in range(n_rounds)]
            rounds_t.append((time.perf_counter() - t0) / n_rounds)
            t0 = time.perf_counter()
            hoisted = [rounds_hoisted(steps, signs, spec, x[i]) for i in range(n_rounds)]
            hoisted_t.append((time.perf_counter() - t0) / n_rounds)
        exact = all(torch.equal(y[i], ref[i]) and torch.equal(hoisted[i], ref[i]) for i in range(n_rounds))
        max_diff = max(float((y[i] - ref[i]).abs().max()) for i in range(n_rounds))
        assert max_diff <= 1e-4 * float(ref[0].abs().max()), "composed RapidGrad differs from apply_by_rounds"
        vec_bytes = d * 4
        entry = {
            "d": d, "padded_d": spec.padded_d, "k": args.k, "lam": args.lam,
            "build": {"shuffle_steps_s": median(steps_t), "signs_s": median(signs_t),
                      "permutation_s": median(perm_t), "total_s": median(perm_t) + median(signs_t)},
            "apply": {
                "composed": {"batch": args.apply_batch, "s_per_vector": median(composed_t) / args.apply_batch,
                             "gb_per_s": vec_bytes * args.apply_batch / median(composed_t) / 1e9},
                "apply_by_rounds": {"s_per_vector": median(rounds_t), "gb_per_s": vec_bytes / median(rounds_t) / 1e9},
                "rounds_tables_hoisted": {"s_per_vector": median(hoisted_t),
                                          "gb_per_s": vec_bytes / median(hoisted_t) / 1e9},
            },
            "bit_exact": exact, "max_abs_diff": max_diff,
        }
        entry["apply"]["speedup_vs_apply_by_rounds"] = median(rounds_t) / entry["apply"]["composed"]["s_per_vector"]
        log(f"rapidgrad: D={d:.0e}: build {entry['build']['total_s']:.2f} s; composed "
            f"{entry['apply']['composed']['gb_per_s']:.2f} GB/s vs apply_by_rounds "
            f"{entry['apply']['apply_by_rounds']['gb_per_s']:.3f} GB/s; bit-exact {exact}")
        out.append(entry)
    return out


def rapidgrad_tables(res: list[dict]) -> str:
    b = table("RapidGrad gather-index build (CPU, once per spec and process)",
              ["D", "D' (padded)", "shuffle_steps s", "signs s", "permutation() s (incl. steps)", "build total s"],
              [[f"{e['d']:.0e}", f"{e['padded_d']:,}", e["build"]["shuffle_steps_s"], e["build"]["signs_s"],
                e["build"]["permutation_s"], e["build"]["total_s"]] for e in res])
    rows = []
    for e in res:
        a = e["apply"]
        rows.append([f"{e['d']:.0e}", f"composed gather (RapidGrad, batch {a['composed']['batch']})",
                     a["composed"]["s_per_vector"], a["composed"]["gb_per_s"],
                     f"{a['speedup_vs_apply_by_rounds']:.1f}x"])
        rows.append([f"{e['d']:.0e}", "apply_by_rounds (1 vector)", a["apply_by_rounds"]["s_per_vector"],
                     a["apply_by_rounds"]["gb_per_s"], "1x"])
        rows.append([f"{e['d']:.0e}", "rounds, tables precomputed (1 vector)",
                     a["rounds_tables_hoisted"]["s_per_vector"],
                     a["rounds_tables_hoisted"]["gb_per_s"],
                     f"{a['apply_by_rounds']['s_per_vector'] / a['rounds_tables_hoisted']['s_per_vector']:.1f}x"])
    a = table(f"RapidGrad apply (K={res[0]['k']}, lam={res[0]['lam']}; GB/s of fp32 input)",
              ["D", "method", "s / vector", "GB/s", "speedup"], rows)
    checks = "\n".join(f"- D={e['d']:.0e}: composed vs apply_by_rounds bit-exact: {e['bit_exact']} "
                       f"(max |diff| {e['max_abs_diff']:.1e})" for e in res)
    return b + "\n" + a + "\n\n" + checks


# --------------------------------------------------------------------------------------------- main

