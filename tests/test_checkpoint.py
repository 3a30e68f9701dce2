"""Safe, strict checkpoint loading: round trips, preset detection, and refusals."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

import fastsample
from conftest import golden_labels, load_manifest, manifest_stems
from fastsample import CheckpointError, Classifier, SuperResUNet, UNet, load_model, save_checkpoint
from fastsample.checkpoint import auto_dtype, create_model, detect_presets

GOLDEN_MODELS = {"unet_a": UNet, "sr": SuperResUNet, "classifier": Classifier}


def _golden_model(golden, key):
    config, g = golden
    model = GOLDEN_MODELS[key](**config[key])
    model.load_state_dict(g[f"{key}_state_dict"])
    return model.eval(), model.config


def _forward(model, golden, key):
    config, g = golden
    with torch.no_grad():
        if key == "classifier":
            return model(g["in_x"], g["in_t"])
        y = golden_labels(config[key], g)
        if key == "sr":
            return model(g["in_x"], g["in_t"], low_res=g["in_low_res"], y=y)
        return model(g["in_x"], g["in_t"], y)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("key", sorted(GOLDEN_MODELS))
def test_round_trip_gives_identical_outputs(golden, tmp_path, key, suffix):
    model, config = _golden_model(golden, key)
    path = save_checkpoint(model, tmp_path / f"tiny{suffix}")
    # .safetensors carries its config; a .pt file is a plain state_dict and needs the config.
    loaded = load_model(path, preset=None if suffix == ".safetensors" else config)
    assert type(loaded) is type(model) and loaded.config == config
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    # the same weights on the same kernels (load_model's "auto") compute the same bits
    model.set_kernels(loaded.kernels_on())
    assert torch.equal(_forward(loaded, golden, key), _forward(model, golden, key))
    assert [p.name for p in tmp_path.iterdir()] == [f"tiny{suffix}"]  # no temporary left over
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not mkstemp's 0600


def test_released_pt_file_is_a_plain_state_dict(golden, tmp_path):
    model, config = _golden_model(golden, "unet_a")
    path = save_checkpoint(model, tmp_path / "tiny.pt")
    state_dict = torch.load(path, weights_only=True)
    assert list(state_dict) == list(model.state_dict())


def test_load_model_applies_the_requested_precision(golden, tmp_path):
    model, config = _golden_model(golden, "unet_a")
    path = save_checkpoint(model, tmp_path / "tiny.safetensors")
    fp16_config = type(config)(**{**config.__dict__, "use_fp16": True})
    # dtype None is "auto": float32 on the CPU, the config's use_fp16 elsewhere.
    auto = load_model(path, preset=fp16_config)
    assert auto.dtype == torch.float32 and auto.input_blocks[0][0].weight.dtype == torch.float32
    assert auto_dtype(fp16_config, "cpu") == torch.float32
    assert auto_dtype(fp16_config, "cuda") == auto_dtype(fp16_config, "meta") == torch.float16
    assert auto_dtype(config, "cuda") == torch.float32  # use_fp16 False
    meta = create_model("64x64_diffusion", device="meta")
    assert meta.dtype == torch.float16 and meta.input_blocks[0][0].weight.dtype == torch.float16
    assert create_model("64x64_diffusion").input_blocks[0][0].weight.dtype == torch.float32
    readme = load_model(path, preset=fp16_config, dtype=torch.float16)
    assert readme.dtype == torch.float16 and readme.input_blocks[0][0].weight.dtype == torch.float16
    full = load_model(path, preset=fp16_config, dtype=torch.float32)
    assert full.dtype == torch.float32 and full.input_blocks[0][0].weight.dtype == torch.float32
    bf16 = load_model(path, dtype=torch.bfloat16)
    assert bf16.input_blocks[0][0].weight.dtype == torch.bfloat16
    assert bf16.time_embed[0].weight.dtype == torch.float32


@pytest.mark.parametrize("stem", manifest_stems())
def test_detection_finds_the_preset_from_manifest_shapes(stem):
    m = load_manifest(stem)
    state_dict = {k: torch.empty(shape, device="meta") for k, shape in m["state_dict"].items()}
    matches = detect_presets(state_dict)
    assert stem in matches
    # Several files share one network (256x256_diffusion_uncond and the LSUN models): every
    # match must build exactly the same network, differing in diffusion settings only.
    networks = {
        tuple(sorted(vars(fastsample.presets[s].network).items(), key=str)) for s in matches
    }
    assert len({tuple((k, v) for k, v in n if k != "dropout") for n in networks}) == 1


@pytest.fixture(scope="module")
def real_classifier_file(tmp_path_factory):
    """A full-size 128x128 classifier checkpoint (42.6M random parameters) under a neutral name."""
    model = fastsample.create_model("128x128_classifier")
    torch.manual_seed(0)
    state_dict = {k: torch.randn_like(v) * 0.02 for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("ckpt") / "weights.safetensors"
    save_file(state_dict, str(path))  # no fastsample metadata, like a converted release file
    return path, state_dict


def test_full_size_file_is_detected_and_loaded_strictly(real_classifier_file):
    path, state_dict = real_classifier_file
    model = load_model(path)
    assert model.preset == "128x128_classifier"
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state_dict.items())
    x, t = torch.randn(1, 3, 128, 128), torch.tensor([500])
    reference = Classifier(fastsample.presets["128x128_classifier"].network)
    reference.load_state_dict(state_dict)
    reference.set_kernels(model.kernels_on())
    with torch.no_grad():
        assert torch.equal(model(x, t), reference.eval()(x, t))


def test_file_name_selects_the_preset(real_classifier_file, tmp_path):
    path, _ = real_classifier_file
    named = tmp_path / "128x128_classifier.safetensors"
    os.link(path, named)
    assert load_model(named).preset == "128x128_classifier"


def test_state_dict_of_another_preset_is_refused(real_classifier_file, tmp_path):
    path, _ = real_classifier_file
    wrong = tmp_path / "256x256_classifier.safetensors"
    os.link(path, wrong)
    with pytest.raises(CheckpointError) as err:
        load_model(wrong)
    message = str(err.value)
    assert "does not fit preset '256x256_classifier'" in message
    assert "missing keys: input_blocks.15" in message  # 256 has 18 input blocks, 128 has 15
    assert "mis-shaped keys" in message and "The closest preset is '128x128_classifier'" in message
    with pytest.raises(CheckpointError, match="does not fit preset '64x64_classifier'"):
        load_model(path, preset="64x64_classifier")


def test_unknown_network_names_the_closest_preset(real_classifier_file, tmp_path):
    _, state_dict = real_classifier_file
    partial = {k: v for k, v in state_dict.items() if not k.startswith("out.")}
    path = tmp_path / "custom.pt"
    torch.save(partial, path)
    with pytest.raises(
        CheckpointError,
        match="matches no preset; the closest is '128x128_classifier'.*missing keys: out.0.weight",
    ):
        load_model(path)


class _Payload:
    """Unpickling this object would call open(marker, "w") and create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_with_code_payload_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        torch.save({"weight": torch.zeros(2), "x": _Payload(marker)}, f)
    # Make sure the payload is real: a plain (unsafe) unpickle would have run it.
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="needs Python code to run while unpickling"):
        load_model(path, preset="64x64_classifier")
    assert not marker.exists()
    unsafe = torch.load(path, weights_only=False)  # control: the unsafe path does run it
    unsafe["x"].close()
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_pickle_file_is_refused(tmp_path):
    path = tmp_path / "raw.pt"
    path.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}))
    with pytest.raises(CheckpointError, match="not a torch checkpoint|does not hold a state_dict"):
        load_model(path, preset="64x64_classifier")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file_is_refused(golden, tmp_path, suffix):
    model, config = _golden_model(golden, "unet_a")
    path = save_checkpoint(model, tmp_path / f"tiny{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(path, preset=config)


def test_safetensors_with_a_wrong_shape_names_the_key(golden, tmp_path):
    model, config = _golden_model(golden, "unet_a")
    path = save_checkpoint(model, tmp_path / "tiny.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        state_dict = {k: f.get_tensor(k) for k in f.keys()}
    state_dict["out.2.weight"] = state_dict["out.2.weight"][:3].clone()
    save_file(state_dict, str(path), metadata=metadata)
    with pytest.raises(
        CheckpointError,
        match=r"mis-shaped keys: out.2.weight \(expected \[6, 32, 3, 3\], found \[3, 32, 3, 3\]\)",
    ):
        load_model(path)


def test_missing_file_and_bad_suffix(tmp_path, golden):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nothing.pt")
    model, _ = _golden_model(golden, "unet_a")
    with pytest.raises(ValueError, match="expected a .pt or .safetensors suffix"):
        save_checkpoint(model, tmp_path / "model.bin")
    assert list(tmp_path.iterdir()) == []


def test_backend_keyword_is_a_deprecated_name_of_kernels():
    from fastsample import create_model

    assert load_model("demo-mnist", kernels="torch").kernels_on() == "torch"
    with pytest.warns(DeprecationWarning, match="backend= is renamed kernels=") as record:
        model = load_model("demo-mnist", backend="torch")
    assert model.kernels_on() == "torch"
    assert record[0].filename == __file__  # reported where it is called
    with pytest.warns(DeprecationWarning):
        assert create_model("demo-mnist", backend="torch").kernels_on() == "torch"
    with pytest.raises(ValueError, match="give kernels= only"), pytest.warns(DeprecationWarning):
        create_model("demo-mnist", kernels="onednn", backend="torch")
