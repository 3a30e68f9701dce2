"""What a network is: parameters, FLOPs of one forward, attention layout. Computed on the meta
device, so describing even the 512x512 networks allocates nothing."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from .catalog import Preset, get_preset
from .checkpoint import create_model
from .config import ClassifierConfig, NetworkConfig, SuperResConfig


@dataclass
class Summary:
    name: str
    kind: str
    config: NetworkConfig
    parameters: int
    state_dict_keys: int
    flops: int  # one batch-1 forward, 2 * MACs of conv / matmul, as torch.utils.flop_counter
    flops_by_op: dict[str, int]
    attention_layers: list[dict] = field(default_factory=list)
    preset: Preset | None = None


def example_inputs(config: NetworkConfig, batch: int = 1, device="meta") -> tuple[tuple, dict]:
    """Arguments of one forward call: (args, kwargs)."""
    size, channels = config.image_size, config.in_channels
    x = torch.randn(batch, channels, size, size, device=device)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    kwargs = {}
    if isinstance(config, SuperResConfig):
        kwargs["low_res"] = torch.randn(batch, channels, size // 4, size // 4, device=device)
    if not isinstance(config, ClassifierConfig) and config.num_classes is not None:
        kwargs["y"] = torch.zeros(batch, dtype=torch.long, device=device)
    return (x, t), kwargs


def count_flops(model: torch.nn.Module, config: NetworkConfig, batch: int = 1):
    args, kwargs = example_inputs(config, batch, next(model.parameters()).device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*args, **kwargs)
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), by_op


def summarize(preset: str | NetworkConfig, dtype: torch.dtype | None = None) -> Summary:
    """Describe a preset (by stem) or a config, building it on the meta device."""
    model = create_model(preset, device="meta", dtype=dtype)
    config = model.config
    flops, by_op = count_flops(model, config)
    return Summary(
        name=preset if isinstance(preset, str) else type(config).__name__,
        kind=type(model).__name__,
        config=config,
        parameters=sum(p.numel() for p in model.parameters()),
        state_dict_keys=len(model.state_dict()),
        flops=flops,
        flops_by_op=by_op,
        attention_layers=config.attention_layers(),
        preset=get_preset(preset) if isinstance(preset, str) else None,
    )


def format_summary(s: Summary) -> str:
    cfg = s.config
    lines = [
        f"{s.name}: {s.kind}, {s.parameters:,} parameters, {s.state_dict_keys} state_dict keys",
        f"  image {cfg.image_size}x{cfg.image_size}, model_channels {cfg.model_channels}, "
        f"channel_mult {tuple(cfg.channel_mult)}, res blocks {cfg.num_res_blocks}, "
        f"attention at ds {tuple(cfg.attention_resolutions)}, torso "
        f"{'float16' if cfg.use_fp16 else 'float32'} (README)",
        f"  forward, batch 1: {s.flops / 1e9:,.2f} GFLOPs ("
        + ", ".join(f"{op} {n / 1e9:,.2f}" for op, n in sorted(s.flops_by_op.items()))
        + ")",
    ]
    p = s.preset
    if p is not None and p.diffusion is not None:
        d = p.diffusion
        lines.append(
            f"  diffusion: {d.steps} steps, {d.noise_schedule} schedule, "
            f"learned sigma {d.learn_sigma}, README respacing {d.timestep_respacing!r}"
        )
    if p is not None and p.classifier:
        lines.append(f"  guidance (README): {p.classifier}, scale {p.classifier_scale}")
    if p is not None and p.low_res_size:
        lines.append(
            f"  upsamples {p.low_res_size}x{p.low_res_size} -> {cfg.image_size}x{cfg.image_size}"
        )
    lines.append(f"  attention layers ({len(s.attention_layers)}):")
    lines.append(f"    {'module':<20} {'channels':>8} {'heads':>5} {'head_dim':>8}  qkv order")
    for a in s.attention_layers:
        lines.append(
            f"    {a['module']:<20} {a['channels']:>8} {a['heads']:>5} {a['head_dim']:>8}  "
            f"{a['order']}"
        )
    return "\n".join(lines)
