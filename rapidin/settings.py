"""The one settings class: environment (RAPIDIN_*), .env file, secrets as SecretStr."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .config import SketchConfig, SketchMethod, default_of, field_of
from .urls import check_url


class Settings(BaseSettings):
    """Deployment settings; algorithm options live in rapidin.config."""

    model_config = SettingsConfigDict(env_prefix="RAPIDIN_", env_file=".env", extra="ignore")

    store_url: str = Field("file://./.rapidin/cache", description="Root URL of the gradient cache store.")
    data_url: str = Field("file://./.rapidin/data", description="Root URL for dataset snapshots.")
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (SeaweedFS, MinIO); None for AWS.")
    s3_access_key: SecretStr | None = Field(None, description="S3 access key id.")
    s3_secret_key: SecretStr | None = Field(None, description="S3 secret access key.")
    mlflow_tracking_uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI.")
    mlflow_experiment: str = Field("rapidin", description="MLflow experiment name.")
    mlflow_artifact_location: str | None = Field(
        None, description="Artifact root for a new MLflow experiment (None: the tracking server's default).")
    prefect_api_url: str | None = Field(None, description="Prefect API URL; None uses the ephemeral API.")
    gpu_pool: str = Field("gpu", description="Prefect work pool for gradient and scan runs.")
    gpu_queues: int = Field(1, ge=1, description="Number of GPU work queues gpu-0..gpu-(N-1).")
    poll_seconds: float = Field(2.0, gt=0, description="How often a flow polls the runs it dispatched.")
    device: str = Field("auto", description="Torch device: auto, cpu, cuda or cuda:N.")
    sketch_method: Annotated[SketchMethod, field_of(SketchConfig, "method")] = default_of(SketchConfig, "method")
    k: Annotated[int, field_of(SketchConfig, "k")] = default_of(SketchConfig, "k")
    lam: Annotated[int, field_of(SketchConfig, "lam")] = default_of(SketchConfig, "lam")
    model_cache_dir: str = Field("~/.cache/rapidin/models", description="Local copies of remote models.")

    def default_sketch(self) -> SketchConfig:
        """The sketch of a build that names none: RAPIDIN_SKETCH_METHOD, RAPIDIN_K, RAPIDIN_LAM."""
        return SketchConfig(method=self.sketch_method, k=self.k, lam=self.lam)

    @field_validator("store_url", "data_url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        return check_url(url, "URL")

    def storage_options(self, url: str) -> dict:
        """fsspec options for a URL: S3 credentials and endpoint, never logged."""
        if not url.startswith(("s3://", "s3a://")):
            return {}
        opts: dict = {}
        if self.s3_access_key is not None:
            opts["key"] = self.s3_access_key.get_secret_value()
        if self.s3_secret_key is not None:
            opts["secret"] = self.s3_secret_key.get_secret_value()
        if self.s3_endpoint_url:
            opts["client_kwargs"] = {"endpoint_url": self.s3_endpoint_url}
        return opts
