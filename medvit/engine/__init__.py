"""Training engine shared by every stage: devices and bf16, seeding, atomic checkpoints and
weights, and the :class:`Trainer` (see docs/engine.md)."""

from medvit.engine.checkpoint import (
    CorruptCheckpointError,
    LoadedCheckpoint,
    apply_checkpoint,
    copy_checkpoint,
    load_checkpoint,
    load_state_dict_file,
    load_weights,
    read_checkpoint,
    read_weights_metadata,
    save_checkpoint,
    save_weights,
)
from medvit.engine.device import (
    DeviceError,
    autocast_context,
    bf16_supported,
    cpu_has_native_bf16,
    resolve_bf16,
    resolve_device,
)
from medvit.engine.seed import (
    derive_seed,
    get_rng_state,
    make_generator,
    seed_everything,
    set_rng_state,
    worker_init_fn,
)
from medvit.engine.trainer import (
    TrainConfig,
    Trainer,
    TrainingError,
    TrainResult,
    lr_at_step,
    warmup_cosine_factor,
)

__all__ = [
    "CorruptCheckpointError", "DeviceError", "LoadedCheckpoint", "TrainConfig", "TrainResult", "Trainer",
    "TrainingError", "apply_checkpoint", "autocast_context", "bf16_supported", "copy_checkpoint", "cpu_has_native_bf16",
    "derive_seed", "get_rng_state", "load_checkpoint", "load_state_dict_file", "load_weights", "lr_at_step",
    "make_generator", "read_checkpoint", "read_weights_metadata", "resolve_bf16", "resolve_device",
    "save_checkpoint", "save_weights", "seed_everything", "set_rng_state", "warmup_cosine_factor",
    "worker_init_fn",
]
