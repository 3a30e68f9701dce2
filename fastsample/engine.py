"""The fast engine: minimal latency per guided sampling step.

Per step: the model and the guidance gradient (parameters frozen, no recomputation, the
classifier's attention pool computing only its first query) run concurrently on two CUDA
streams, and one fused Triton kernel (`fastsample.kernels.sampler_step`) does the whole update.
On CUDA the step is captured once per request shape (batch shape, sampler, schedule, guidance) in
a CUDA graph and replayed for every later step of every later batch of that shape: the step
index, the noise, x_t, the multistep history, the labels and low-resolution inputs live in static
device buffers, so a replay costs one launch. The first two steps of a new shape run eagerly (they
warm up the allocator, cuDNN and Triton's compilation, and are real steps), the graph is captured
at the third. With feature caching (`fastsample.featcache`) the deep feature is a static buffer
too, and a shape has a graph for full steps and one for shallow steps.

The fast components check themselves on first use (`fastsample.selfcheck`): the fused update
against the eager update, and the first replay of a graph against an eager step from the same
state; a component that fails is disabled with one warning, and the verdict (with the measured
eager step, replay and capture times) is cached on disk. A shape other than the engine's first
(a run's last, smaller batch) is captured only where those times say capturing pays within one
batch.

`fused_update` is the kernel as an `update` for `fastsample.sampler.run`, the eager solvers'
loop. `FastEngine` runs its static-buffer loop wherever the kernel runs (CUDA; the CPU only under
TRITON_INTERPRET=1, which is how the tests run it without a GPU), else the eager loop. All paths
draw noise in the eager loop's order and give its samples within the dtype's tolerance for the
same seeds.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import featcache, netfns, selfcheck
from . import sampler as solvers
from .errors import InputError


def kernel_available(device: torch.device | str) -> bool:
    from fastsample.kernels import _triton

    device = torch.device(device)
    if not _triton.AVAILABLE:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def fused_update(device: torch.device | str, solver: str) -> solvers.UpdateFn:
    """The fused kernel with the eager updates' signature, for `sampler.run(update=...)`."""
    from fastsample.kernels.sampler_step import sampler_step

    step = torch.zeros((), dtype=torch.int32, device=device)

    def update(tab, i, x, out, grad, scale, z, history, spec):
        step.fill_(i)
        return sampler_step(
            solver, x.float(), out.float(), step, tab, grad=grad, scale=scale, z=z,
            history=history, clip=spec.clip, learn_sigma=spec.learn_sigma,
            predict_xstart=spec.predict_xstart,
        )  # fmt: skip

    return update


def prepared_copy(module: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    """An inference copy of a network for the engine: eval mode, parameters frozen and sharing
    the caller's storage (channels_last re-lays the 4-D weights into new tensors of the copy),
    the classifier's attention pool computing only its first query. The caller's module is
    left as it was."""
    memo: dict[int, object] = {}
    for p in module.parameters():
        memo[id(p)] = torch.nn.Parameter(p.detach(), requires_grad=False)
    for b in module.buffers():
        memo[id(b)] = b
    prepared = copy.deepcopy(module, memo).eval()
    for m in prepared.modules():
        if hasattr(m, "first_query_only"):
            m.first_query_only = True
    if channels_last:
        prepared.to(memory_format=torch.channels_last)
    return prepared


class FastEngine:
    """Guided sampling on prepared copies of the networks (see the module doc).

    model, classifier: the eager networks; the engine never changes them: it samples with
    `prepared_copy`s that share their weights. Rebuild the engine after changing the weights
    in place. compile: torch.compile the copies. cuda_graphs / streams: on CUDA only.
    self_check: check the fused update and the graphs on first use (`fastsample.selfcheck`);
    None: on CUDA, unless FASTSAMPLE_KERNELS forces a choice ("torch": the eager update,
    "triton": the fused one unchecked).
    """

    MAX_SHAPES = 4  # request shapes whose buffers (and captured graphs) are kept
    WARMUP_STEPS = 2  # eager steps of a new shape before its graph is captured

    def __init__(
        self,
        model,
        classifier=None,
        *,
        channels_last: bool | None = None,
        compile: bool = False,
        cuda_graphs: bool = True,
        streams: bool = True,
        self_check: bool | None = None,
    ):
        self.device = next(model.parameters()).device
        cuda = self.device.type == "cuda"
        self.channels_last = cuda if channels_last is None else bool(channels_last)
        self.model = prepared_copy(model, self.channels_last)
        self.classifier = (
            prepared_copy(classifier, self.channels_last) if classifier is not None else None
        )
        self._model = torch.compile(self.model) if compile else self.model
        # feature caching's two forwards (bound methods compile separately from the module)
        split, shallow = getattr(self.model, "forward_split", None), None
        if split is not None:
            shallow = self.model.forward_shallow
            if compile:
                split, shallow = torch.compile(split), torch.compile(shallow)
        self._split, self._shallow = split, shallow
        self._classifier = (
            torch.compile(self.classifier) if compile and self.classifier is not None
            else self.classifier
        )  # fmt: skip
        self.cuda_graphs = cuda and cuda_graphs
        self.streams = cuda and streams
        forced = selfcheck.forced()
        self.self_check = (cuda and forced is None) if self_check is None else bool(self_check)
        self.fused = forced != "torch"  # the fused update (where the kernel runs)
        # Created once: no stream is created while a graph is being captured.
        self._side = torch.cuda.Stream(self.device) if self.streams else None
        self._warm = torch.cuda.Stream(self.device) if self.cuda_graphs else None
        self._static: dict[tuple, _Static] = {}  # per request shape (see sample)
        self._params = sum(p.numel() for p in self.model.parameters())
        self._dtype = next(self.model.parameters()).dtype

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def model_fn(self, y=None, low_res=None) -> netfns.ModelFn:
        return netfns.model_fn(self._model, y, low_res, layout=self._layout)

    def guidance_fn(self, y) -> netfns.GuidanceFn:
        return netfns.guidance_fn(self._classifier, y, layout=self._layout)

    def sample(self, sampler, diffusion, noise, *, y=None, model_y=None, low_res=None,
               eta=0.0, guidance_scale=0.0, guidance_interval=None, guidance_every=1,
               stable_guidance=False, clip_denoised=True, callback=None, cache_interval=1,
               cache_depth=None):  # fmt: skip
        """x_0 from noise(0) = x_T (noise(k): the fresh noise of step k), as sampler.run (the
        same guidance plan: interval, every k-th step, stable guidance). cache_interval,
        cache_depth: feature caching as `fastsample.sample` (`fastsample.featcache`).

        Where the fused kernel runs (CUDA; the CPU under TRITON_INTERPRET=1) the loop runs on
        static buffers kept per request shape (`_Static`): a run's later batches of the same
        shape reuse them and, on CUDA, replay the step graphs captured for the first (with
        caching, one for full steps and one for shallow steps; the deep feature lives in a
        static buffer)."""
        if eta < 0:
            raise InputError(f"eta={eta}: expected >= 0")
        cache = featcache.settings(self.model, cache_interval, cache_depth)
        guided = self.classifier is not None and guidance_scale != 0
        plan = solvers.guidance_plan(sampler, diffusion, guidance_interval, guidance_every,
                                     stable_guidance)  # fmt: skip
        x_T, fresh = noise(0), noise  # drawn once: noise sources are streams

        def noise(k: int) -> torch.Tensor:
            return x_T if k == 0 else fresh(k)

        with torch.no_grad():
            if self._fused_update(sampler, diffusion, x_T.shape, guided, eta, clip_denoised):
                solvers.advise(solvers.get_solver(sampler), diffusion, plan, guided)
                return self._static_loop(sampler, diffusion, noise, y if guided else None,
                                         model_y, low_res, float(eta), float(guidance_scale),
                                         bool(clip_denoised), callback, plan, cache)  # fmt: skip
            model = self.model_fn(model_y, low_res)
            if cache is not None:
                model = featcache.cached_model_fn(
                    self.model, model_y, low_res, interval=cache[0], depth=cache[1],
                    layout=self._layout, split=self._split, shallow=self._shallow,
                )  # fmt: skip
            return solvers.run(
                sampler, model, diffusion, noise,
                guidance=self.guidance_fn(y) if guided else None, guidance_scale=guidance_scale,
                guidance_interval=guidance_interval, guidance_every=guidance_every,
                stable_guidance=stable_guidance, eta=eta, clip_denoised=clip_denoised,
                callback=callback,
            )  # fmt: skip

    def _fused_update(self, sampler, diffusion, shape, guided, eta, clip) -> bool:
        """Whether this request runs the fused update on static buffers (else the eager loop):
        where the kernel runs, not forced off, and (when self-checking) correct and faster for
        this shape class."""
        if not (self.fused and kernel_available(self.device)):
            return False
        if not self.self_check:
            return True
        solver = solvers.get_solver(sampler)
        use = selfcheck.fused_update_choice(
            solver, solver.tables_for(diffusion, self.device, eta, guided),
            solvers.Spec(diffusion.learn_sigma, diffusion.predict_xstart, bool(clip)),
            tuple(shape), self.device, guided, solver.adds_noise(float(eta)),
        )  # fmt: skip
        return use == "fused"

    def _step_body(self, st: _Static, x: torch.Tensor, kind: tuple[bool, bool]) -> None:
        """One step on static buffers: t from the device step index, the model (kind[1]: the
        whole UNet, else its shallow part on the cached feature) and (kind[0]: where the plan
        computes it) the gradient (on a side stream when enabled), the fused update written
        into x in place. Where the plan reuses gradients they live in st.grad, and the update
        weighs them by the step's guide weight (0 where the plan does not guide)."""
        from fastsample.kernels.sampler_step import sampler_step

        compute, full = kind
        t = st.tables["t_model"].index_select(0, st.step.long().reshape(1)).expand(x.shape[0])
        grad = st.grad
        if st.guidance is None or not compute:
            out = self._model_call(st, x, t, full)
        elif self.streams:
            side = self._side
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                grad = st.guidance(x, t)
            out = self._model_call(st, x, t, full)
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:
            out = self._model_call(st, x, t, full)
            grad = st.guidance(x, t)
        if compute and st.grad is not None and grad is not st.grad:
            st.grad.copy_(grad)
            grad = st.grad
        spec = st.spec
        sampler_step(
            st.solver.name,
            x,
            out.float(),
            st.step,
            st.tables,
            grad=grad,
            scale=st.scale,
            guide=st.guide,
            z=st.z,
            history=st.history,
            clip=spec.clip,
            learn_sigma=spec.learn_sigma,
            predict_xstart=spec.predict_xstart,
            x_next=x,
            x0=st.x0,
        )  # fmt: skip  (in place: each element is read, then written)

    @staticmethod
    def _model_call(st: _Static, x: torch.Tensor, t: torch.Tensor, full: bool) -> torch.Tensor:
        """The model's output; with feature caching a full step also refreshes st.feature (a
        static buffer, made at the first full step, which always runs before any capture)."""
        if st.cache is None:
            return st.model(x, t)
        if not full:
            return st.shallow(x, t, st.feature)
        out, feature = st.split(x, t)
        if st.feature is None:
            st.feature = torch.empty_like(feature)  # the torso's dtype and memory format
        st.feature.copy_(feature)
        return out

    def _prepare(self, key, sampler, diffusion, shape, y, model_y, low_res, eta, scale, clip,
                 plan, cache):  # fmt: skip
        """Static buffers (and on CUDA the captured step) for one request shape."""
        solver = solvers.get_solver(sampler)
        device = self.device

        def static(t):
            return None if t is None else t.to(device).clone()

        st = _Static(
            solver=solver,
            tables=solver.tables_for(diffusion, device, eta, y is not None),
            spec=solvers.Spec(diffusion.learn_sigma, diffusion.predict_xstart, clip),
            scale=scale,
            x=torch.zeros(shape, device=device),
            z=torch.zeros(shape, device=device) if solver.adds_noise(eta) else None,
            x0=torch.zeros(shape, device=device),
            history=_zeros(solver.history_shape(tuple(shape)), device),
            step=torch.full((), diffusion.num_steps - 1, dtype=torch.int32, device=device),
            y=static(y),
            model_y=static(model_y),
            low_res=static(low_res),
            cache=cache,
        )
        if y is not None and not plan.everywhere:  # steps that skip or reuse the gradient
            st.grad = torch.zeros(shape, device=device)
            st.guide = torch.tensor(plan.use, dtype=torch.float32, device=device)
        st.model = self.model_fn(st.model_y, st.low_res)
        if cache is not None:
            st.split, st.shallow = featcache.split_fns(
                self.model, st.model_y, st.low_res, cache[1], self._layout, self._split,
                self._shallow,
            )  # fmt: skip
        st.guidance = self.guidance_fn(st.y) if st.y is not None else None
        if self._model is not self.model:
            # torch.compile traces the kernel choices in: make them (the self-checks run) with
            # one uncompiled call first.
            t = st.tables["t_model"][-1:].expand(shape[0])
            netfns.model_fn(self.model, st.model_y, st.low_res, layout=self._layout)(st.x, t)
            if st.y is not None:
                netfns.guidance_fn(self.classifier, st.y, layout=self._layout)(st.x, t)
        if self.cuda_graphs:
            st.graph_class = selfcheck.graph_class(solver.name, tuple(shape), self._dtype,
                                                   self._params, st.y is not None)  # fmt: skip
            if st.grad is not None:
                st.graph_class += " guidance-plan"
            if cache is not None:
                st.graph_class += f" feature-cache-depth{cache[1]}"
            st.verdict = selfcheck.cached("cuda_graph", st.graph_class, device)
            st.capture_at = self._capture_step(st.verdict, diffusion.num_steps,
                                               first=not self._static)  # fmt: skip
        while len(self._static) >= self.MAX_SHAPES:  # the oldest goes (dicts keep order)
            self._static.pop(next(iter(self._static)))
        self._static[key] = st
        return st

    def _capture_step(self, verdict: selfcheck.Check | None, num_steps: int, first: bool) -> int:
        """The step k at which a new shape's graph is captured (0: never): after the warm-up
        steps, where steps are left to replay and no cached verdict says the graph is wrong
        or slower. A shape after the engine's first (a run's last, smaller batch, seen once)
        is captured only where the measured times say it pays within one batch: the steps left
        times what a replay saves over an eager step, against the capture."""
        left = num_steps - self.WARMUP_STEPS
        if left <= 1 or (verdict is not None and verdict.use != "graph"):
            return 0
        ms = verdict.ms if verdict is not None else {}
        if not first and {"eager", "graph", "capture"} <= set(ms):
            if left * (ms["eager"] - ms["graph"]) <= ms["capture"]:
                return 0
        return self.WARMUP_STEPS + 1

    def _capture(self, st: _Static, kind: tuple[bool, bool]):
        """Record one step on the static buffers (CUDA graph)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step_body(st, st.x, kind)
        return graph

    def _eager_step(self, st: _Static, kind: tuple[bool, bool]) -> None:
        """One step outside a graph; before a capture on the warm-up stream (libraries set
        themselves up on the stream they first run on)."""
        if self._warm is None:
            self._step_body(st, st.x, kind)
            return
        current = torch.cuda.current_stream(self.device)
        self._warm.wait_stream(current)
        with torch.cuda.stream(self._warm):
            self._step_body(st, st.x, kind)
        current.wait_stream(self._warm)

    def _capture_and_step(self, st: _Static, kind: tuple[bool, bool]) -> None:
        """A step at or after capture_at whose kind (computing the gradient or not; the whole
        UNet or its shallow part) has no graph yet: capture it, replay it, and (the first time
        on this machine, when self-checking) compare that replay with an eager step from the
        same state, keeping the eager result and dropping the graphs where they disagree."""
        check = self.self_check and st.verdict is None
        ms: dict[str, float] = {}
        state = [t for t in (st.x, st.history, st.grad, st.feature) if t is not None]
        if check:
            saved = [t.clone() for t in state]
            with selfcheck.stopwatch(self.device, ms, "eager"):
                self._eager_step(st, kind)
            eager = [t.clone() for t in (st.x, st.x0, *state[1:])]
            for t, v in zip(state, saved, strict=True):
                t.copy_(v)
        with selfcheck.stopwatch(self.device, ms, "capture"):
            st.graphs[kind] = self._capture(st, kind)
        with selfcheck.stopwatch(self.device, ms, "graph"):
            st.graphs[kind].replay()
        if not check:
            return
        replayed = [st.x, st.x0, *state[1:]]
        verdict = selfcheck.graph_verdict(st.graph_class, self._dtype, tuple(replayed),
                                          tuple(eager), ms)  # fmt: skip
        selfcheck.record(verdict, self.device)
        st.verdict = verdict
        if verdict.use != "graph":
            st.graphs.clear()
            st.capture_at = 0  # eager from now on
            for t, v in zip(replayed, eager, strict=True):
                t.copy_(v)

    def _static_loop(self, sampler, diffusion, noise, y, model_y, low_res, eta, scale, clip,
                     callback, plan, cache):  # fmt: skip
        x_t = noise(0).float()
        key = (
            tuple(x_t.shape), sampler, diffusion, eta, scale, clip, y is not None,
            model_y is not None, None if low_res is None else tuple(low_res.shape),
            plan if y is not None else None, cache,
        )  # fmt: skip
        st = self._static.get(key)
        if st is None:
            st = self._prepare(key, sampler, diffusion, x_t.shape, y, model_y, low_res, eta,
                               scale, clip, plan, cache)  # fmt: skip
        for buffer, value in ((st.y, y), (st.model_y, model_y), (st.low_res, low_res)):
            if buffer is not None:
                buffer.copy_(value)
        st.x.copy_(x_t)
        for buffer in (st.history, st.grad):
            if buffer is not None:
                buffer.zero_()
        n = diffusion.num_steps
        for k in range(1, n + 1):
            st.step.fill_(n - k)
            compute = plan.compute[n - k] if st.grad is not None else True
            full = st.cache is None or featcache.is_full(k - 1, st.cache[0])
            kind = (compute, full)
            if st.solver.draws_noise:
                fresh = noise(k)  # every step, in the eager loop's order
                if st.z is not None:
                    st.z.copy_(fresh)
            if kind in st.graphs:
                st.graphs[kind].replay()
            elif st.capture_at and k >= st.capture_at:
                self._capture_and_step(st, kind)
            else:
                self._eager_step(st, kind)
            if callback is not None:
                callback(k, st.x.clone(), st.x0.clone())
        return st.x.clone()


@dataclass(eq=False)
class _Static:
    """One request shape's static buffers: x_t, the step's noise, x0, the multistep history,
    the step index, labels and low-resolution inputs; the model and guidance functions bound to
    them; on CUDA the captured step graphs (one that computes the gradient, and where the
    guidance plan skips or reuses it, one that does not; with feature caching each for full
    and for shallow steps)."""

    solver: solvers.Solver
    tables: solvers.Tables
    spec: solvers.Spec
    scale: float
    x: torch.Tensor
    z: torch.Tensor | None
    x0: torch.Tensor
    history: torch.Tensor | None
    step: torch.Tensor
    y: torch.Tensor | None
    model_y: torch.Tensor | None
    low_res: torch.Tensor | None
    model: netfns.ModelFn | None = None
    guidance: netfns.GuidanceFn | None = None
    grad: torch.Tensor | None = None  # the last gradient, where the plan reuses or skips it
    guide: torch.Tensor | None = None  # float32 per-step guide weights (0 or 1), with grad
    cache: tuple[int, int] | None = None  # feature caching's (interval, depth)
    split: Callable | None = None  # (x, t) -> (output, deep feature), with caching
    shallow: Callable | None = None  # (x, t, feature) -> output, with caching
    feature: torch.Tensor | None = None  # the last full step's deep feature, with caching
    # by kind: (computes the gradient, runs the whole UNet)
    graphs: dict[tuple[bool, bool], torch.cuda.CUDAGraph] = field(default_factory=dict)
    graph_class: str = ""
    capture_at: int = 0  # the step k at which the graph is captured (0: never)
    verdict: selfcheck.Check | None = None  # the graph's self-check verdict, once known


def _zeros(shape: tuple[int, ...] | None, device) -> torch.Tensor | None:
    return None if shape is None else torch.zeros(shape, device=device)
