"""Time schedules beyond the reference's respacing: uniform in t, in log-SNR, and Karras et al.'s
rho = 7 noise levels, at fractional timesteps of the discrete process (alpha_bar log-linear
between the integer timesteps), against closed forms; end to end through the samplers, the
pipeline, the CLI and the export's schedule.json."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fastsample import Classifier, Diffusion, Pipeline, UNet, sample
from fastsample.cli import main
from fastsample.errors import InputError
from fastsample.export.bundle import diffusion_from_schedule, schedule_json
from fastsample.schedule import (
    alpha_bar_at,
    betas_for,
    coefficients,
    log_alpha_bar_at,
    respace_betas,
    space_timesteps,
)

SCHEDULES = ["time", "logsnr", "karras"]
NOISE = ["linear", "cosine"]
STEP_COUNTS = range(1, 61)


def _alphas_cumprod(noise_schedule: str, steps: int = 1000) -> np.ndarray:
    return np.cumprod(1.0 - betas_for(noise_schedule, steps))


def _log_snr(log_alpha_bar: np.ndarray) -> np.ndarray:
    """lambda = 0.5 log(alpha_bar / (1 - alpha_bar)), with 1 - alpha_bar from the logarithm
    (alpha_bar(0) = 1 - 4e-5 for the cosine schedule: 1 - alpha_bar would lose 12 digits)."""
    return 0.5 * (log_alpha_bar - np.log(-np.expm1(log_alpha_bar)))


# -- the continuous alpha_bar ------------------------------------------------------------------


@pytest.mark.parametrize("noise_schedule", NOISE)
def test_alpha_bar_is_the_discrete_value_at_integers_and_log_linear_between(noise_schedule):
    ac = _alphas_cumprod(noise_schedule)
    steps = np.arange(1000, dtype=np.float64)
    assert np.array_equal(alpha_bar_at(ac, steps), ac)
    assert np.array_equal(log_alpha_bar_at(ac, steps), np.log(ac))
    t = np.random.default_rng(0).uniform(0, 999, 5000)
    independent = np.interp(t, steps, np.log(ac))
    np.testing.assert_allclose(log_alpha_bar_at(ac, t), independent, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(alpha_bar_at(ac, t), np.exp(independent), rtol=1e-13)
    # log-linear between neighbours: the midpoint's log is the mean of the two logs
    k = np.arange(999)
    mid = log_alpha_bar_at(ac, k + 0.5)
    np.testing.assert_allclose(mid, (np.log(ac[k]) + np.log(ac[k + 1])) / 2, rtol=1e-13)
    with pytest.raises(InputError, match="expected 0..999"):
        alpha_bar_at(ac, np.array([999.5]))


# -- closed forms ------------------------------------------------------------------------------


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("noise_schedule", NOISE)
@pytest.mark.parametrize("time_schedule", SCHEDULES)
def test_times_follow_the_closed_forms_for_every_step_count(time_schedule, noise_schedule, rescale):
    ac = _alphas_cumprod(noise_schedule)
    for n in STEP_COUNTS:
        d = Diffusion(noise_schedule=noise_schedule, timestep_respacing=str(n),
                      rescale_timesteps=rescale, time_schedule=time_schedule)  # fmt: skip
        c = d.coefficients()
        t = c.timestep_map
        assert t.dtype == np.float64 and len(t) == d.num_steps == n
        # both endpoints, exactly; strictly ascending times, strictly descending alpha_bar
        assert t[-1] == 999.0 and (n == 1 or t[0] == 0.0)
        assert (np.diff(t) > 0).all() and (np.diff(c.alphas_cumprod) < 0).all()
        assert ((c.betas > 0) & (c.betas <= 1)).all()
        assert np.array_equal(d.model_timesteps(), t * (1000 / 1000) if rescale else t)
        # the respaced process: alpha_bar at the times, via betas as respacing makes them
        # (1 - (1 - alpha_bar) loses digits where alpha_bar is tiny, as in the reference)
        np.testing.assert_allclose(c.alphas_cumprod, alpha_bar_at(ac, t), rtol=1e-12, atol=1e-16)
        if n == 1:
            assert t.tolist() == [999.0]
            continue
        log_ab = log_alpha_bar_at(ac, t)
        assert log_ab[0] == np.log(ac[0]) and log_ab[-1] == np.log(ac[-1])
        if time_schedule == "time":
            assert np.array_equal(t, np.linspace(0, 999, n))
            continue
        # The cosine schedule clips beta(999) to 0.999: the spacing then runs to t = 998, and
        # its first time is moved to 999 (the linear schedule spaces to 999 itself).
        top = 998 if noise_schedule == "cosine" else 999
        log_top = log_alpha_bar_at(ac, np.append(t[:-1], float(top)))
        if time_schedule == "logsnr":
            lam = _log_snr(log_top)
            step = (_log_snr(np.log(ac[0])) - _log_snr(np.log(ac[top]))) / (n - 1)
            assert np.abs(np.diff(lam) + step).max() < 1e-12, n  # lambda falls uniformly
        else:
            sigma = np.sqrt(-np.expm1(log_top) / np.exp(log_top))[::-1]  # descending
            s_max, s_min = np.sqrt((1 - ac[top]) / ac[top]), np.sqrt((1 - ac[0]) / ac[0])
            i, rho = np.arange(n), 7.0
            a, b = s_max ** (1 / rho), s_min ** (1 / rho)
            expected = (a + i / (n - 1) * (b - a)) ** rho
            np.testing.assert_allclose(sigma, expected, rtol=1e-11)


def test_other_diffusion_lengths_and_rescaled_timesteps():
    for time_schedule in SCHEDULES:
        d = Diffusion(steps=500, timestep_respacing="7", rescale_timesteps=True,
                      time_schedule=time_schedule)  # fmt: skip
        t = d.timestep_map
        assert t[0] == 0.0 and t[-1] == 499.0
        assert np.array_equal(d.model_timesteps(), t * 2.0)
    d = Diffusion(steps=500, timestep_respacing="3", time_schedule="time")
    assert d.timestep_map.tolist() == [0.0, 249.5, 499.0]


def test_uniform_time_at_integer_times_is_the_respacing_of_those_timesteps():
    for noise_schedule in NOISE:
        every = Diffusion(noise_schedule=noise_schedule, timestep_respacing="1000",
                          time_schedule="time").coefficients()  # fmt: skip
        full = Diffusion(noise_schedule=noise_schedule).coefficients()
        strided = Diffusion(noise_schedule=noise_schedule, timestep_respacing="10",
                            time_schedule="time").coefficients()  # fmt: skip
        kept = list(range(0, 1000, 111))
        base = betas_for(noise_schedule, 1000)
        for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_mean_coef1"):
            assert np.array_equal(getattr(every, name), getattr(full, name)), name
            same = getattr(coefficients(respace_betas(base, kept), kept), name)
            assert np.array_equal(getattr(strided, name), same), name
        assert np.array_equal(every.timestep_map, full.timestep_map)


# -- "respace" is unchanged --------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["", "250", "ddim25", "10,10,5", "4", "1"])
@pytest.mark.parametrize("noise_schedule", NOISE)
def test_respace_is_the_reference_respacing_bit_for_bit(noise_schedule, spec):
    d = Diffusion(noise_schedule=noise_schedule, timestep_respacing=spec)
    assert d.time_schedule == "respace"
    assert d == Diffusion(noise_schedule=noise_schedule, timestep_respacing=spec,
                          time_schedule="respace")  # fmt: skip
    kept = space_timesteps(1000, spec)
    old = coefficients(respace_betas(betas_for(noise_schedule, 1000), kept), kept)
    new = d.coefficients()
    for field in dataclasses.fields(old):
        a, b = getattr(old, field.name), getattr(new, field.name)
        assert a.dtype == b.dtype and np.array_equal(a, b), field.name
    assert new.timestep_map.dtype == np.int64 and d.model_timesteps().dtype == np.int64


def test_respaced_keeps_or_changes_the_time_schedule():
    d = Diffusion(timestep_respacing="10", time_schedule="karras")
    assert d.respaced("20").time_schedule == "karras"
    assert d.respaced("20").timestep_respacing == "20"
    assert d.respaced("ddim10", time_schedule="respace").time_schedule == "respace"
    preset = Diffusion(noise_schedule="cosine", timestep_respacing="ddim25")
    assert preset.respaced(None) == preset
    assert preset.respaced(None, time_schedule="logsnr") == Diffusion(
        noise_schedule="cosine", timestep_respacing="25", time_schedule="logsnr"
    )
    assert d.respaced(None, time_schedule="time").timestep_respacing == "10"


# -- bad input: one line each ------------------------------------------------------------------


@pytest.mark.parametrize("time_schedule", SCHEDULES)
@pytest.mark.parametrize("spec", ["ddim10", "10,10,5", "", "0", "-3", "1.5", "ten", "٣"])
def test_time_schedules_take_a_plain_step_count(time_schedule, spec):
    with pytest.raises(InputError) as e:
        Diffusion(timestep_respacing=spec, time_schedule=time_schedule)
    message = str(e.value)
    assert message == f"schedule {time_schedule!r} takes a step count such as '10', not {spec!r}"
    assert len(message.splitlines()) == 1
    with pytest.raises(InputError, match="takes a step count"):
        Diffusion().respaced(spec, time_schedule=time_schedule)


def test_unknown_time_schedules_are_refused_with_the_valid_ones():
    with pytest.raises(InputError) as e:
        Diffusion(timestep_respacing="10", time_schedule="cosine")
    assert str(e.value) == (
        "time schedule 'cosine': expected one of 'respace', 'time', 'logsnr', 'karras'"
    )
    assert isinstance(e.value, ValueError)


# -- sampling at fractional timesteps ----------------------------------------------------------


@pytest.fixture
def one_thread():
    """Small networks run fastest on one thread, most of all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_networks(golden):
    """The golden tiny UNet and classifier (16x16, 10 classes), with trained-looking weights."""
    config, g = golden
    model = UNet(**config["unet_a"])
    model.load_state_dict(g["unet_a_state_dict"])
    classifier = Classifier(**config["classifier"])
    classifier.load_state_dict(g["classifier_state_dict"])
    return model.eval(), classifier.eval().requires_grad_(False)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m", "ddpm"])
@pytest.mark.parametrize("time_schedule", SCHEDULES)
def test_samplers_run_on_time_schedules_and_feed_fractional_timesteps(
    tiny_networks, one_thread, time_schedule, sampler
):
    model, classifier = tiny_networks
    d = Diffusion(timestep_respacing="5", time_schedule=time_schedule)
    seen = {"model": [], "classifier": []}
    hooks = [
        model.register_forward_pre_hook(lambda m, args: seen["model"].append(args[1].tolist())),
        classifier.register_forward_pre_hook(
            lambda m, args: seen["classifier"].append(args[1].tolist())
        ),
    ]
    try:
        x = sample(model, d, (1, 3, 16, 16), y=torch.tensor([4]), sampler=sampler,
                   classifier=classifier, guidance_scale=1.0, seed=3)  # fmt: skip
    finally:
        for hook in hooks:
            hook.remove()
    assert x.shape == (1, 3, 16, 16) and bool(torch.isfinite(x).all())
    expected = [[float(np.float32(t))] for t in d.model_timesteps()[::-1]]
    assert seen["model"] == expected
    assert seen["classifier"] == expected
    assert any(t[0] != int(t[0]) for t in expected)  # fractional timesteps reached the networks


# -- pipeline, CLI, export ---------------------------------------------------------------------


def test_pipeline_generate_takes_a_schedule(tiny_checkpoints, one_thread):
    pipe = Pipeline.from_pretrained(tiny_checkpoints["model"], tiny_checkpoints["classifier"])
    out = pipe.generate(1, steps=3, schedule="karras", progress=False)
    assert out.images.shape == (1, 16, 16, 3)
    # without steps: the preset's (here the file's: ddim4) number of steps
    d, *_ = pipe._request(2, 2, None, None, None, None, 0, None, 0, "logsnr")
    assert d == tiny_checkpoints["diffusion"].respaced("4", time_schedule="logsnr")
    d, *_ = pipe._request(2, 2, None, None, None, None, 0, None, 0, None)
    assert d == tiny_checkpoints["diffusion"]
    with pytest.raises(InputError, match="schedule 'time' takes a step count such as '10', not"):
        pipe.check(2, steps="ddim4", schedule="time")
    with pytest.raises(InputError, match="time schedule 'fast': expected one of"):
        pipe.check(2, steps=4, schedule="fast")


def test_cli_sample_with_a_schedule_on_the_demo(tmp_path, one_thread):
    out = tmp_path / "run"
    args = ["sample", "--schedule", "logsnr", "--steps", "3", "--num-samples", "2",
            "--batch-size", "2", "--quiet", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    with np.load(out / "samples.npz") as data:
        assert data["arr_0"].shape == (2, 32, 32, 1)
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["schedule"] == "logsnr" and settings["steps"] == "3"
    # the default leaves the record as it was before schedules (older runs still resume)
    plain = tmp_path / "plain"
    result = CliRunner().invoke(main, ["sample", *args[3:-1], str(plain)])
    assert result.exit_code == 0, result.output
    assert "schedule" not in json.loads((plain / "run.json").read_text())["settings"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["sample", "--schedule", "karras", "--steps", "ddim10"],
         "error: schedule 'karras' takes a step count such as '10', not 'ddim10'"),
        (["sample", "--schedule", "time", "--steps", "10,10,5"],
         "error: schedule 'time' takes a step count such as '10', not '10,10,5'"),
        (["export", "--schedule", "logsnr", "--steps", "ddim5"],
         "error: schedule 'logsnr' takes a step count such as '10', not 'ddim5'"),
    ],
)  # fmt: skip
def test_cli_refuses_a_bad_schedule_and_steps_pair_in_one_line(tmp_path, extra, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [*extra, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == message
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("command", ["sample", "export"])
def test_cli_help_explains_each_schedule_in_one_line(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0
    assert "--schedule [respace|time|logsnr|karras]" in result.output
    lines = [line.strip() for line in result.output.splitlines()]
    for name, says in [("respace", "reference"), ("time", "uniform in t"),
                       ("logsnr", "uniform in log-SNR"), ("karras", "rho = 7")]:  # fmt: skip
        assert any(line.startswith(f"{name}  ") and says in line for line in lines), name


@pytest.mark.parametrize("time_schedule", SCHEDULES)
def test_schedule_json_carries_fractional_times_and_round_trips(time_schedule):
    d = Diffusion(noise_schedule="cosine", timestep_respacing="7", time_schedule=time_schedule)
    schedule = json.loads(json.dumps(schedule_json(d)))
    assert diffusion_from_schedule(schedule) == d
    assert schedule["timestep_map"] == d.timestep_map.tolist()
    assert np.array_equal(np.array(schedule["tables"]["t_model"]), d.model_timesteps())


def test_schedule_json_written_before_time_schedules_still_loads():
    schedule = schedule_json(Diffusion(timestep_respacing="ddim4"))
    del schedule["diffusion"]["time_schedule"]
    assert diffusion_from_schedule(schedule) == Diffusion(timestep_respacing="ddim4")


@pytest.mark.parametrize("noise_schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps", ["10", "ddim10", "25", "4"])
def test_schedule_json_guide_table_skips_only_where_the_gain_is_over_1000(noise_schedule, steps):
    """fastsample-run guides where schedule.json's guide table says: everywhere but the steps
    whose eps-form guidance gain (1 - abar) / sqrt(abar) exceeds 1000 (cosine t = 999 only;
    linear t = 999 has about 158), from the schedule's own float64 alpha_bar."""
    schedule = schedule_json(Diffusion(noise_schedule=noise_schedule, timestep_respacing=steps))
    abar = np.array(schedule["tables"]["alphas_cumprod"])
    want = [0.0 if g > 1000 else 1.0 for g in (1 - abar) / np.sqrt(abar)]
    assert schedule["tables"]["guide"] == want
    skipped = [t for t, g in zip(schedule["timestep_map"], want, strict=True) if not g]
    starts_at_999 = steps in ("10", "25", "4")
    assert skipped == ([999] if noise_schedule == "cosine" and starts_at_999 else [])
