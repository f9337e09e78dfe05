"""The trainable stages of LDCSR (LightningModules) and the checkpoint loader for inference."""

from models.loading import load_first_stage_model, load_sr_model

__all__ = ["load_first_stage_model", "load_sr_model"]
