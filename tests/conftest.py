"""Shared test fixtures: deterministic random inputs, reproducible per test.

Each test's ``rng`` is seeded from a fixed hash (CRC-32) of its pytest node id, so a test draws
the same inputs on every run, in every process and under ``pytest -n``. A failing test's report
has an "arjax seed" section with the seed and the command that replays it;
``ARJAX_TEST_SEED=<int>`` overrides the seed of every test (to replay, or to try fresh inputs).
"""

from __future__ import annotations

import os
import tempfile
import zlib

# The Mosaic GPU interpreter (tests/test_flash_attention_mosaic.py) runs a kernel's warpgroups as
# threads that block inside XLA host callbacks; with XLA's CPU thread pool sized to a 2-core
# machine they can starve each other (a hang). NPROC sizes that pool; it must be set before the
# CPU client is created.
os.environ.setdefault("NPROC", "8")
# The suite's shapes are tiny: XLA's CPU compiles, not the runs, are most of its time, and
# LLVM at -O0 halves them (the tiny HAT's init: 10.5 s -> 5.3 s on 2 cores). Appended to
# XLA_FLAGS here, before the CPU client exists, so the CLI's and notebooks' child processes
# inherit it.
# One on-disk compilation cache for the whole run (both xdist workers, the CLI's and
# notebooks' child processes): many tests compile the same tiny programs (a preset's train
# step, its decode loop). Entries are keyed by the program, the XLA version and the flags, so a
# hit is the executable a fresh compile would give.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "arjax-tests-xla-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]
).strip()
# glibc would give each of the larger pool's threads its own malloc arena, and the resident set
# would creep (tests/reliability/test_long_run.py): cap the arenas (M_ARENA_MAX = -8).
try:
    import ctypes

    ctypes.CDLL(None).mallopt(-8, 2)
except (OSError, AttributeError):  # not glibc
    pass

import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np
import pytest

# Tests compare against float32 references: keep matmuls exact on CPU.
jax.config.update("jax_default_matmul_precision", "highest")


SEED_ENV = "ARJAX_TEST_SEED"
_SEED = pytest.StashKey[int]()


def seed_for(nodeid: str) -> int:
    """The seed of the test ``nodeid``: ``$ARJAX_TEST_SEED`` if set, else CRC-32 of the id."""
    override = os.environ.get(SEED_ENV, "").strip()
    if override:
        try:
            return int(override)
        except ValueError:
            raise ValueError(f"{SEED_ENV} must be an integer, got {override!r}") from None
    return zlib.crc32(nodeid.encode())


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """Random inputs for one test, seeded by ``seed_for`` of its node id."""
    seed = seed_for(request.node.nodeid)
    request.node.stash[_SEED] = seed
    return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """On failure of a test that drew from ``rng``, report its seed and how to replay it."""
    report = (yield).get_result()
    if report.failed and _SEED in item.stash:
        seed = item.stash[_SEED]
        report.sections.append(
            ("arjax seed", f"rng seed {seed}; replay: {SEED_ENV}={seed} pytest '{item.nodeid}'")
        )


def _compile_interpreted_threads_once() -> None:
    """The Mosaic GPU interpreter runs each warpgroup of a kernel as a thread that evaluates the
    kernel body's jaxpr (``thread_map._run_jaxpr`` in jax 0.10/0.11), and it lowers and compiles
    that jaxpr again on every call (``jit(...).trace(...).lower().compile()`` skips jit's cache,
    and programs with host callbacks skip the on-disk cache): one ~1.3 s compile per warpgroup of
    every CTA, most of an interpreted kernel test's time. Here each jaxpr is compiled once per
    argument signature and the executable reused: the same program runs on the same inputs
    (``races`` still sees every kernel's race-detector state), only the recompiles go."""
    try:
        from jax._src.pallas.mosaic.interpret import thread_map
    except ImportError:
        return
    if not hasattr(thread_map, "_run_jaxpr"):
        return
    import threading

    compiled, lock = {}, threading.Lock()

    def run(jaxpr, consts, *args):
        jax.core.eval_jaxpr(jaxpr, consts, *args)

    def run_jaxpr(jaxpr, consts, *args):
        key = (id(jaxpr), tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves((consts, args))))
        with lock:
            hit = compiled.get(key)
        if hit is None:  # the jaxpr is kept alive with its executable, so ids are not reused
            exe = jax.jit(run, static_argnums=(0,)).trace(jaxpr, consts, *args).lower().compile()
            with lock:
                hit = compiled.setdefault(key, (jaxpr, exe))
        hit[1](consts, *args)

    thread_map._run_jaxpr = run_jaxpr


_compile_interpreted_threads_once()


class MosaicRaces:
    """Every Mosaic GPU kernel interpreted since the fixture started, each with its own race
    detector state (the interpreter makes a fresh ``RaceDetectionState`` per kernel and keeps
    only the last one, so a call running several kernels must be checked kernel by kernel)."""

    def __init__(self) -> None:
        self.states: list = []

    def check(self, kernels: int) -> None:
        """Assert that exactly ``kernels`` kernels ran since the last check, each of them under
        the race detector (it recorded shared-memory accesses) and race-free."""
        states, self.states = self.states, []
        assert len(states) == kernels, f"{len(states)} Mosaic GPU kernels ran, expected {kernels}"
        for i, state in enumerate(states):
            assert state.reads and state.writes, f"kernel {i} ran without the race detector"
            assert not state.races_found, f"the interpreter detected a data race in kernel {i}"


@pytest.fixture
def gpu_target():
    """``with gpu_target(): jax.export(..., platforms=["cuda"])``: lowers GPU kernels on a
    machine without a GPU, for an abstract H200 (jax >= 0.11's Triton lowering asks the target
    device for its compute capability)."""
    h200 = jax.sharding.AbstractMesh(
        (1,), ("x",), (jax.sharding.AxisType.Auto,),
        abstract_device=jax.sharding.AbstractDevice("NVIDIA H200", None, "gpu"),
    )  # fmt: skip
    return lambda: jax.sharding.use_abstract_mesh(h200)


@pytest.fixture
def races(monkeypatch: pytest.MonkeyPatch) -> MosaicRaces:
    """Interpret the Mosaic GPU kernels (forwards and backwards) with race detection on and
    record each kernel's detector state. (The GPU interpreter has no public names in jax
    0.10/0.11: this reads ``jax._src.pallas.mosaic_gpu.interpret``.)"""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    from kernels_pallas.flash_attention import mosaic_gpu_bwd, mosaic_gpu_fwd
    from kernels_pallas.gated_delta import mosaic_gpu_bwd as gated_delta_mosaic_gpu_bwd
    from kernels_pallas.gated_delta import mosaic_gpu_fwd as gated_delta_mosaic_gpu_fwd
    from kernels_pallas.linear_attention_scan import mosaic_gpu_fwd as scan_mosaic_gpu_fwd

    # the class is ``GPURaceDetectionState`` from jax 0.11 (the device's), ``RaceDetectionState``
    # before (CI's)
    name = next(
        n for n in ("GPURaceDetectionState", "RaceDetectionState") if hasattr(gpu_callbacks, n)
    )
    recorder, new_state = MosaicRaces(), getattr(gpu_callbacks, name)

    def record(*args, **kwargs):
        recorder.states.append(new_state(*args, **kwargs))
        return recorder.states[-1]

    params = InterpretGPUParams(detect_races=True)
    monkeypatch.setattr(gpu_callbacks, name, record)
    modules = (mosaic_gpu_fwd, mosaic_gpu_bwd, scan_mosaic_gpu_fwd, gated_delta_mosaic_gpu_bwd,
               gated_delta_mosaic_gpu_fwd)  # fmt: skip
    for module in modules:
        monkeypatch.setattr(module, "interpret_params", lambda: params)
    return recorder


def _max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.fixture
def within_xla_error():
    """``check(got, ref, xla)``: each named low-precision (bf16/fp16) result in ``got`` is at
    most as far (max |.|) from its float32 reference in ``ref`` as the plain XLA computation in
    the same dtype (``xla``, e.g. ``attention(..., impl="xla")`` and its autodiff gradients,
    which round logits, probabilities and every gradient product to that dtype). The bound is
    at least one ulp of the dtype at the largest reference value: rounding a float32 result
    to the dtype costs half an ulp, and a float32 sum in another order can cross a rounding
    boundary (a baseline that happened to round the other way is not an achievable bound)."""

    def check(got: dict, ref: dict, xla: dict, dtype=None) -> None:
        """``dtype``: the computation's (default: each result's own)."""
        for name, r in ref.items():
            low = jnp.dtype(dtype or np.asarray(got[name]).dtype)
            eps = float(jnp.finfo(low).eps) if low != jnp.float32 else 0.0
            floor = eps * float(np.max(np.abs(np.asarray(r, np.float32))))
            bound = max(_max_abs(xla[name], r), floor) + floor  # + one ulp: summation order
            err = _max_abs(got[name], r)
            print(f"{name}: max |err| {err:.3g}, plain XLA in {low} {bound:.3g}")
            assert err <= bound, f"{name}: max |err| {err:.3g} > the plain XLA error {bound:.3g}"

    return check
