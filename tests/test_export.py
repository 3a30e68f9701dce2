"""Export: ONNX graphs of the UNet and of the guidance gradient, the ONNX Runtime backend,
`fastsample export` / `fastsample verify`, and the TensorRT code path's graph preparation.

float32 graphs are held to 1e-5 of the output's scale: they differ from eager PyTorch only in
summation order (measured 3e-7 .. 2e-6). Sampling loops compound that over guided steps (each
step divides by sqrt(alpha_bar)): 1e-4. float16 torsos round every layer to 11 significant bits
(eps 9.8e-4) over ~30 layers: 2e-2.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np

# onnx and onnxruntime come with the [test] extra: a missing install fails here, loudly.
import onnx  # onnx and onnxruntime come with the [test] extra: no skip if absent
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from conftest import rel_err
from fastsample import Classifier, Diffusion, SuperResUNet, UNet, sample
from fastsample.catalog import DEMO_UNET, PRESETS
from fastsample.checkpoint import load_model
from fastsample.cli import main
from fastsample.export import ExportError, export, load
from fastsample.export.bundle import check_hashes, read_manifest, sha256_file
from fastsample.export.graphs import (
    _decompositions,
    classifier_grad_graph,
    unet_graph,
)
from fastsample.export.onnx import OrtGraph, choose_providers
from fastsample.netfns import guidance_fn

DEMO_CLASSIFIER = PRESETS[DEMO_UNET].classifier


@pytest.fixture(scope="module")
def demo():
    torch.manual_seed(0)
    return {
        "model": load_model(DEMO_UNET),
        "classifier": load_model(DEMO_CLASSIFIER),
        "diffusion": PRESETS[DEMO_UNET].diffusion.respaced("ddim10"),
    }


@pytest.fixture(scope="module")
def demo_export(demo, tmp_path_factory):
    """The demo model and its classifier exported once (fp32, ONNX)."""
    out = tmp_path_factory.mktemp("exports") / "demo"
    export(
        demo["model"],
        demo["diffusion"],
        out,
        classifier=demo["classifier"],
        model_source=DEMO_UNET,
        classifier_source=DEMO_CLASSIFIER,
    )
    return out


def _session_inputs(io, tensors):
    return {name: t.numpy() for (name, _, _), t in zip(io.inputs, tensors, strict=True)}


# -- graphs ------------------------------------------------------------------------------------


def test_unet_onnx_graph_layout(demo_export):
    model = onnx.load(str(demo_export / "unet.onnx"))
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == 21
    ops = {n.op_type for n in model.graph.node}
    assert "GroupNormalization" in ops  # native at opset 21, not decomposed
    names = [i.name for i in model.graph.input]
    assert names == ["x", "t", "y"]
    x = model.graph.input[0].type.tensor_type.shape.dim
    assert x[0].dim_param and [d.dim_value for d in x[1:]] == [1, 32, 32]  # dynamic batch
    assert [o.name for o in model.graph.output] == ["out"]


@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_unet_matches_eager(demo, demo_export, batch):
    graph = unet_graph(demo["model"])
    io = graph.io()
    inputs = io.example(batch, torch.Generator().manual_seed(batch), classes=10)
    session = ort.InferenceSession(str(demo_export / "unet.onnx"))
    (got,) = session.run(None, _session_inputs(io, inputs))
    with torch.no_grad():
        want = graph(*inputs)
    assert got.shape == (batch, 2, 32, 32)
    assert rel_err(torch.from_numpy(got), want) < 1e-5


@pytest.mark.parametrize("batch", [1, 5])
def test_gradient_graph_matches_autograd(demo, demo_export, batch):
    clf = demo["classifier"]
    gen = torch.Generator().manual_seed(10 + batch)
    x = torch.randn(batch, 1, 32, 32, generator=gen)
    t = torch.rand(batch, generator=gen) * 999
    y = torch.randint(0, 10, (batch,), generator=gen)
    want = guidance_fn(clf, y)(x, t)
    session = ort.InferenceSession(str(demo_export / "classifier_grad.onnx"))
    (got,) = session.run(None, {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()})
    assert want.abs().max() > 0
    assert rel_err(torch.from_numpy(got), want) < 1e-5
    # The graph has no autograd in it: a plain forward computation.
    ops = {n.op_type for n in onnx.load(str(demo_export / "classifier_grad.onnx")).graph.node}
    assert "ConvTranspose" in ops  # the convolutions' input gradients


def _input_grad_via_decompositions(module, x):
    """Trace d(sum(module(x) * w))/dx with fastsample's decompositions (weights passed as
    inputs, as the exporter does); return (traced result, autograd result)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    names = [n for n, _ in module.named_parameters()]
    params = [p.detach() for _, p in module.named_parameters()]
    w = torch.randn_like(module(x))

    def grad(x, w, *ps):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            out = torch.func.functional_call(module, dict(zip(names, ps, strict=True)), (x,))
            (g,) = torch.autograd.grad((out * w).sum(), x)
        return g

    trace = make_fx(grad, tracing_mode="symbolic", decomposition_table=_decompositions())
    gm = trace(x, w, *params)
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert not any("backward" in t for t in targets), targets
    return gm(x, w, *params), grad(x, w, *params)


@pytest.mark.parametrize("size", [8, 9, 10])
@pytest.mark.parametrize("stride", [1, 2])
def test_convolution_input_gradient_decomposition(size, stride):
    # Odd sizes with stride 2 leave rows the convolution never read: output_padding case.
    conv = torch.nn.Conv2d(3, 4, 3, stride=stride, padding=1)
    x = torch.randn(2, 3, size, size + 1)
    traced, want = _input_grad_via_decompositions(conv, x)
    assert traced.shape == x.shape
    assert rel_err(traced, want) < 1e-6


@pytest.mark.parametrize("size", [8, 9])
def test_average_pool_input_gradient_decomposition(size):
    pool = torch.nn.AvgPool2d(2, 2)
    x = torch.randn(2, 3, size, size)
    traced, want = _input_grad_via_decompositions(pool, x)
    assert torch.equal(traced, want)  # a broadcast of grad / 4: exact


def test_overlapping_average_pool_gradient_is_refused():
    pool = torch.nn.AvgPool2d(3, 1)
    with pytest.raises(NotImplementedError, match="non-overlapping"):
        _input_grad_via_decompositions(pool, torch.randn(1, 1, 6, 6))


def test_traced_gradient_module_on_tiny_classifier(golden):
    config, g = golden
    clf = Classifier(**config["classifier"])
    clf.load_state_dict(g["classifier_state_dict"])
    module = classifier_grad_graph(clf)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 3, 16, 16, generator=gen)
    t = torch.tensor([0.0, 400.0, 999.0])
    y = torch.tensor([1, 5, 9])
    want = guidance_fn(clf, y)(x, t)
    assert rel_err(module(x, t, y), want) < 1e-5
    # Any batch: the trace is symbolic in the batch size.
    assert rel_err(module(x[:1], t[:1], y[:1]), want[:1]) < 1e-5


# -- the export directory ----------------------------------------------------------------------


def test_manifest_and_schedule(demo, demo_export):
    manifest = read_manifest(demo_export)
    assert manifest["target"] == "onnx" and manifest["dtype"] == "fp32"
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["versions"]["onnx"] == onnx.__version__
    assert set(manifest["files"]) == {"unet.onnx", "classifier_grad.onnx", "schedule.json"}
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((demo_export / name).read_bytes()).hexdigest() == digest
    grad = manifest["graphs"]["classifier_grad"]
    assert [i["name"] for i in grad["inputs"]] == ["x", "t", "y"]
    assert grad["inputs"][0]["shape"] == ["batch", 1, 32, 32]
    assert grad["outputs"] == [{"name": "grad", "dtype": "float32", "shape": ["batch", 1, 32, 32]}]
    assert manifest["guidance_scale"] == PRESETS[DEMO_UNET].classifier_scale
    assert manifest["model"]["source"] == DEMO_UNET

    schedule = json.loads((demo_export / "schedule.json").read_text())
    d = demo["diffusion"]
    c = d.coefficients()
    assert schedule["timestep_map"] == c.timestep_map.tolist()
    assert Diffusion(**schedule["diffusion"]) == d
    tables = schedule["tables"]
    # float64 values survive JSON exactly.
    assert np.array_equal(np.array(tables["alphas_cumprod"]), c.alphas_cumprod)
    assert np.array_equal(np.array(tables["posterior_mean_coef1"]), c.posterior_mean_coef1)
    assert np.array_equal(np.array(tables["t_model"]), d.model_timesteps())


def test_export_refuses_a_non_empty_directory_and_keeps_it(demo, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not empty"):
        export(demo["model"], demo["diffusion"], out)
    assert (out / "mine.txt").read_text() == "keep me"


def test_failed_export_leaves_nothing(demo, tmp_path, monkeypatch):
    import fastsample.export.onnx as onnx_mod

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(onnx_mod, "export_onnx", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export(demo["model"], demo["diffusion"], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no out, no staging directory


def test_export_keeps_the_callers_networks(golden, tmp_path):
    config, g = golden
    unet = UNet(**config["unet_a"])
    unet.load_state_dict(g["unet_a_state_dict"])
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    export(unet, Diffusion(timestep_respacing="ddim4"), tmp_path / "e", dtype="fp16")
    assert unet.dtype == torch.float32
    for k, v in unet.state_dict().items():
        assert torch.equal(v, before[k]), k


# -- sampling on ONNX Runtime ------------------------------------------------------------------


def test_ort_guided_ddim_matches_eager(demo, demo_export):
    graphs = load(demo_export)
    assert graphs.runtime == "onnxruntime" and graphs.device.type == "cpu"
    d = demo["diffusion"]
    y = torch.tensor([0, 3, 7, 9])
    noise = torch.randn(d.num_steps + 1, 4, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    common = dict(y=y, sampler="ddim", guidance_scale=2.0, noise=noise, return_trajectory=True)
    eager = sample(demo["model"], d, (4, 1, 32, 32), classifier=demo["classifier"], **common)
    onnx_run = sample(graphs, d, (4, 1, 32, 32), runtime="onnxruntime", **common)
    for k in range(d.num_steps):
        assert rel_err(onnx_run["samples"][k], eager["samples"][k]) < 1e-4, k
    # Guidance acted: unguided samples differ far beyond that tolerance.
    unguided = sample(demo["model"], d, (4, 1, 32, 32), y=y, sampler="ddim", noise=noise)
    assert rel_err(unguided, eager["sample"]) > 1e-2


def test_ort_ancestral_sampling_matches_eager(demo, demo_export):
    graphs = load(demo_export)
    d = demo["diffusion"]
    y = torch.tensor([1, 2])
    noise = torch.randn(d.num_steps + 1, 2, 1, 32, 32, generator=torch.Generator().manual_seed(6))
    common = dict(y=y, sampler="ddpm", guidance_scale=2.0, noise=noise)
    eager = sample(demo["model"], d, (2, 1, 32, 32), classifier=demo["classifier"], **common)
    got = sample(graphs, d, (2, 1, 32, 32), runtime="onnxruntime", **common)
    assert rel_err(got, eager) < 1e-4


def test_pipeline_from_export_generates_like_eager(demo, demo_export):
    from fastsample import Pipeline

    eager = Pipeline(demo["model"], demo["diffusion"], demo["classifier"], guidance_scale=2.0)
    exported = Pipeline.from_export(demo_export)
    assert exported.guidance_scale == 2.0 and exported.num_classes == 10
    kwargs = dict(batch_size=3, classes=[4, 5], sampler="ddim", seed=7, progress=False)
    a = eager.generate(5, **kwargs)
    b = exported.generate(5, **kwargs)
    assert np.array_equal(a.labels, b.labels)
    diff = np.abs(a.images.astype(int) - b.images.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999


def test_sample_exports_eager_networks_into_the_cache(golden, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSAMPLE_CACHE", str(tmp_path / "cache"))
    config, g = golden
    unet = UNet(**config["unet_a"])
    unet.load_state_dict(g["unet_a_state_dict"])
    clf = Classifier(**config["classifier"])
    clf.load_state_dict(g["classifier_state_dict"])
    d = Diffusion(timestep_respacing="ddim4")
    y = torch.tensor([2, 8])
    noise = torch.randn(5, 2, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    common = dict(y=y, sampler="ddim", classifier=clf, guidance_scale=1.5, noise=noise)
    want = sample(unet, d, (2, 3, 16, 16), **common)
    got = sample(unet, d, (2, 3, 16, 16), runtime="onnxruntime", **common)
    assert rel_err(got, want) < 1e-4
    exports = list((tmp_path / "cache" / "exports").iterdir())
    assert len(exports) == 1 and (exports[0] / "classifier_grad.onnx").is_file()
    sample(unet, d, (2, 3, 16, 16), runtime="onnxruntime", **common)  # reuses it
    assert list((tmp_path / "cache" / "exports").iterdir()) == exports


def test_sample_cli_runtime_matches_eager(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSAMPLE_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    base = [
        "sample",
        "--model",
        str(tiny_checkpoints["model"]),
        "--classifier",
        str(tiny_checkpoints["classifier"]),
        "--num-samples",
        "3",
        "--batch-size",
        "2",
        "--classes",
        "1,4",
        "--quiet",
    ]
    eager = runner.invoke(main, [*base, "--out", str(tmp_path / "eager")])
    assert eager.exit_code == 0, eager.output
    onnx_run = runner.invoke(
        main, [*base, "--runtime", "onnxruntime", "--out", str(tmp_path / "ort")]
    )
    assert onnx_run.exit_code == 0, onnx_run.output
    with (
        np.load(tmp_path / "eager" / "samples.npz") as a,
        np.load(tmp_path / "ort" / "samples.npz") as b,
    ):
        assert np.array_equal(a["arr_1"], b["arr_1"])
        diff = np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999
    assert len(list((tmp_path / "cache" / "exports").iterdir())) == 1


def test_upsampler_and_unconditional_graphs(golden, tmp_path):
    config, g = golden
    sr = SuperResUNet(**config["sr"])
    sr.load_state_dict(g["sr_state_dict"])
    out = export(sr, Diffusion(timestep_respacing="ddim4"), tmp_path / "sr")
    graphs = load(out)
    io = graphs.unet.io
    assert io.input_names == ["x", "t", "low_res", "y"]
    x, t, low, y = io.example(3, torch.Generator().manual_seed(0), classes=10)
    with torch.no_grad():
        want = sr(x, t, low_res=low, y=y)
    assert rel_err(graphs.unet(x, t, low, y), want) < 1e-5

    cfg = dict(config["unet_a"], num_classes=None)
    uncond = UNet(**cfg)
    out = export(uncond, Diffusion(timestep_respacing="ddim4"), tmp_path / "uncond")
    graphs = load(out)
    assert graphs.unet.io.input_names == ["x", "t"]
    x, t = graphs.unet.io.example(2, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(graphs.unet(x, t), uncond(x, t)) < 1e-5


def test_fp16_graph_keeps_norm_and_softmax_in_fp32(golden, tmp_path):
    config, g = golden
    unet = UNet(**config["unet_a"])
    unet.load_state_dict(g["unet_a_state_dict"])
    out = export(unet, Diffusion(timestep_respacing="ddim4"), tmp_path / "fp16", dtype="fp16")
    model = onnx.shape_inference.infer_shapes(onnx.load(str(out / "unet.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    types.update({i.name: i.type.tensor_type.elem_type for i in model.graph.input})
    types.update({i.name: i.data_type for i in model.graph.initializer})
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    norms = [n for n in model.graph.node if n.op_type == "GroupNormalization"]
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert convs and norms and softmax
    assert sum(types.get(n.input[1]) == f16 for n in convs) >= len(convs) - 2  # torso in fp16
    assert all(types.get(n.input[0]) == f32 for n in norms)
    assert all(types.get(n.input[0]) == f32 for n in softmax)
    # Against the eager fp16 network (same precision): 2e-2, see the module doc.
    graphs = load(out)
    x, t, y = graphs.unet.io.example(5, torch.Generator().manual_seed(2), classes=10)
    eager16 = UNet(**config["unet_a"])
    eager16.load_state_dict(g["unet_a_state_dict"])
    eager16.set_precision(torch.float16)
    with torch.no_grad():
        want16, want32 = eager16(x, t, y), unet(x, t, y)
    got = graphs.unet(x, t, y)
    assert rel_err(got, want16) < 2e-2
    assert rel_err(got, want32) < 2e-2
    assert rel_err(got, want32) > 1e-6  # it really ran in fp16


def test_bf16_graph(golden, tmp_path):
    from fastsample.errors import BackendUnavailable

    config, g = golden
    unet = UNet(**config["unet_a"])
    unet.load_state_dict(g["unet_a_state_dict"])
    out = export(unet, Diffusion(timestep_respacing="ddim4"), tmp_path / "bf16", dtype="bf16")
    model = onnx.load(str(out / "unet.onnx"))
    # bfloat16 convolutions exist in ONNX from opset 22 on.
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == 22
    inits = {i.name: i.data_type for i in model.graph.initializer}
    conv_types = [inits.get(n.input[1]) for n in model.graph.node if n.op_type == "Conv"]
    assert conv_types.count(onnx.TensorProto.BFLOAT16) >= len(conv_types) - 2
    try:
        graphs = load(out)
    except BackendUnavailable as e:  # ONNX Runtime's CPU provider has no bfloat16 Conv
        assert "unet.onnx" in str(e) and "bf16" in str(e)
    else:
        x, t, y = graphs.unet.io.example(2, torch.Generator().manual_seed(0), classes=10)
        with torch.no_grad():
            want = unet(x, t, y)
        assert rel_err(graphs.unet(x, t, y), want) < 1e-1  # 8-bit mantissa, see verify.py


def test_load_refuses_a_tampered_export(demo_export, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(demo_export, bad)
    with open(bad / "schedule.json", "a") as f:
        f.write(" ")
    with pytest.raises(ExportError, match="schedule.json: sha256 differs"):
        load(bad)
    assert check_hashes(demo_export, read_manifest(demo_export)) == []


def test_provider_order():
    assert choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    both = ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]
    assert choose_providers(both) == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert choose_providers(both, device="cpu") == ["CPUExecutionProvider"]
    with pytest.raises(RuntimeError, match="onnx-gpu"):
        choose_providers(["CPUExecutionProvider"], device="cuda")


def test_ort_graph_binds_torch_memory(demo_export):
    manifest = read_manifest(demo_export)
    from fastsample.export.bundle import graph_io

    io = graph_io(manifest["graphs"]["unet"])
    graph = OrtGraph(demo_export / "unet.onnx", io, ["CPUExecutionProvider"])
    x, t, y = io.example(2, torch.Generator().manual_seed(4), classes=10)
    out = graph(x, t, y)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2, 32, 32)
    (ref,) = graph.session.run(None, _session_inputs(io, (x, t, y)))
    assert np.array_equal(out.numpy(), ref)


# -- the CLI -----------------------------------------------------------------------------------


def test_verify_cli_passes_on_a_fresh_export(demo_export):
    result = CliRunner().invoke(main, ["verify", str(demo_export)])
    assert result.exit_code == 0, result.output
    assert result.output.count("[PASSED]") == 4  # two graphs at batch 1 and 5
    assert "PASSED: 4 checks" in result.output


def test_verify_cli_fails_on_a_changed_file(demo_export, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(demo_export, bad)
    data = bytearray((bad / "unet.onnx").read_bytes())
    data[-100] ^= 0xFF
    (bad / "unet.onnx").write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["verify", str(bad)])
    assert result.exit_code == 1
    assert "unet.onnx: sha256 differs" in result.output


def test_verify_cli_fails_on_wrong_numbers_with_consistent_hashes(demo_export, tmp_path):
    # A graph whose weights were changed and whose manifest was re-hashed: only the numerical
    # comparison with eager PyTorch can tell.
    from onnx import numpy_helper

    bad = tmp_path / "bad"
    shutil.copytree(demo_export, bad)
    model = onnx.load(str(bad / "classifier_grad.onnx"))
    init = max(model.graph.initializer, key=lambda i: np.prod(i.dims))
    array = numpy_helper.to_array(init) * 1.01
    init.CopyFrom(numpy_helper.from_array(array.astype(np.float32), init.name))
    onnx.save(model, str(bad / "classifier_grad.onnx"))
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"]["classifier_grad.onnx"] = sha256_file(bad / "classifier_grad.onnx")
    (bad / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["verify", str(bad)])
    assert result.exit_code == 1, result.output
    assert "[FAILED] classifier_grad" in result.output
    assert "[PASSED] unet" in result.output


def test_export_cli_errors_are_one_line(tmp_path):
    runner = CliRunner()
    out = tmp_path / "o"
    out.mkdir()
    (out / "x").write_text("x")
    cases = [
        (["export", "--out", str(out)], "not empty"),
        (["export", "--out", str(tmp_path / "n"), "--steps", "ddim7x"], "ddim7x"),
        (["export", "--out", str(tmp_path / "n"), "--model", "nope.pt"], "nope.pt"),
        (["verify", str(tmp_path / "missing")], "not a directory"),
        (["verify", str(out)], "no manifest.json"),
    ]
    for args, needle in cases:
        result = runner.invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        assert needle in result.output and "Traceback" not in result.output
    assert not (tmp_path / "n").exists()


def test_export_cli_refuses_tensorrt_without_it(tmp_path):
    from fastsample.export.tensorrt import require_tensorrt

    try:
        require_tensorrt()
    except RuntimeError as e:
        reason = str(e)
    else:
        pytest.skip("TensorRT and a GPU are present here")
    result = CliRunner().invoke(
        main, ["export", "--target", "tensorrt", "--out", str(tmp_path / "t")]
    )
    assert result.exit_code == 2
    assert reason in result.output
    assert not (tmp_path / "t").exists()
    result = CliRunner().invoke(
        main, ["sample", "--runtime", "tensorrt", "--out", str(tmp_path / "s"), "--quiet"]
    )
    assert result.exit_code == 2 and reason in result.output
    assert "Traceback" not in result.output and not (tmp_path / "s").exists()


def test_sample_cli_runs_an_export(demo_export, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "sample",
            "--model",
            str(demo_export),
            "--num-samples",
            "2",
            "--steps",
            "ddim5",
            "--classes",
            "3",
            "--quiet",
            "--out",
            str(tmp_path / "s"),
        ],
    )
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "s" / "samples.npz") as data:
        assert data["arr_0"].shape == (2, 32, 32, 1) and data["arr_1"].tolist() == [3, 3]


# -- TensorRT: graph preparation everywhere, engines where TensorRT and a GPU exist ------------


def test_tensorrt_graph_preparation(demo_export):
    from fastsample.export.bundle import graph_io
    from fastsample.export.tensorrt import engine_cache_key, profile_shapes, unsupported_ops

    manifest = read_manifest(demo_export)
    for name, entry in manifest["graphs"].items():
        assert unsupported_ops(demo_export / entry["file"]) == [], name
    io = graph_io(manifest["graphs"]["unet"])
    shapes = profile_shapes(io, max_batch=16, opt_batch=4)
    assert shapes["x"] == ((1, 1, 32, 32), (4, 1, 32, 32), (16, 1, 32, 32))
    assert shapes["t"] == ((1,), (4,), (16,)) and shapes["y"] == ((1,), (4,), (16,))
    assert profile_shapes(io, max_batch=2, opt_batch=8)["t"][1] == (2,)  # opt within range
    with pytest.raises(ValueError, match="max_batch"):
        profile_shapes(io, max_batch=0)
    digest = manifest["files"]["unet.onnx"]
    key = engine_cache_key(digest, "10.13.0", "NVIDIA H100 80GB HBM3", {"x": shapes["x"]})
    assert key == engine_cache_key(digest, "10.13.0", "NVIDIA H100 80GB HBM3", {"x": shapes["x"]})
    others = {
        engine_cache_key("0" * 64, "10.13.0", "NVIDIA H100 80GB HBM3", {"x": shapes["x"]}),
        engine_cache_key(digest, "11.0.0", "NVIDIA H100 80GB HBM3", {"x": shapes["x"]}),
        engine_cache_key(digest, "10.13.0", "NVIDIA H200", {"x": shapes["x"]}),
        engine_cache_key(digest, "10.13.0", "NVIDIA H100 80GB HBM3", {"x": shapes["t"]}),
    }
    assert key not in others and len(others) == 4


def _tensorrt_ready() -> bool:
    try:
        from fastsample.export.tensorrt import require_tensorrt

        require_tensorrt()
        return True
    except RuntimeError:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _tensorrt_ready(), reason="needs the tensorrt package and a CUDA GPU")
def test_tensorrt_guided_ddim_matches_eager(demo, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSAMPLE_CACHE", str(tmp_path / "cache"))
    model, clf = demo["model"].cuda(), demo["classifier"].cuda()
    d = demo["diffusion"]
    out = export(model, d, tmp_path / "trt", classifier=clf, target="tensorrt", max_batch=8)
    graphs = load(out)
    y = torch.tensor([0, 3, 7, 9], device="cuda")
    noise = torch.randn(d.num_steps + 1, 4, 1, 32, 32, device="cuda")
    common = dict(y=y, sampler="ddim", guidance_scale=2.0, noise=noise)
    eager = sample(model, d, (4, 1, 32, 32), classifier=clf, **common)
    got = sample(graphs, d, (4, 1, 32, 32), runtime="tensorrt", **common)
    assert rel_err(got, eager) < 1e-3  # TF32 tactics are allowed by TensorRT's defaults


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_aoti_cuda_guided_ddim_matches_eager(tmp_path):
    model = load_model(DEMO_UNET, device="cuda")
    clf = load_model(DEMO_CLASSIFIER, device="cuda")
    d = PRESETS[DEMO_UNET].diffusion.respaced("ddim10")
    out = export(model, d, tmp_path / "aoti", classifier=clf, target="aoti", device="cuda")
    assert read_manifest(out)["device"] == "cuda"
    graphs = load(out)
    assert graphs.device.type == "cuda"
    y = torch.tensor([0, 3, 7, 9], device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    noise = torch.randn(d.num_steps + 1, 4, 1, 32, 32, device="cuda", generator=gen)
    common = dict(y=y, sampler="ddim", guidance_scale=2.0, noise=noise)
    eager = sample(model, d, (4, 1, 32, 32), classifier=clf, **common)
    got = sample(graphs, d, (4, 1, 32, 32), runtime="aoti", **common)
    assert rel_err(got, eager) < 1e-3  # cuDNN / Triton kernel choices may use TF32
