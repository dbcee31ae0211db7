"""Tests for arjax.train.checkpoint: round trips, retention, async, resharding, corruption."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from arjax.train.checkpoint import Checkpointer, NoValidCheckpointError
from arjax.train.state import TrainState

# Orbax/TensorStore reads of damaged files can leave callbacks firing into a closed event loop.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def make_state(seed: int, *, typed_key: bool = True) -> TrainState:
    """A tiny AdamW state whose every leaf depends on ``seed``."""
    kw, kb = jax.random.split(jax.random.key(seed))
    params = {"w": jax.random.normal(kw, (16, 8)), "b": jax.random.normal(kb, (8,))}
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, opt_state, params)
    rng = jax.random.key(seed + 100) if typed_key else jax.random.PRNGKey(seed + 100)
    return TrainState(
        step=jnp.int32(seed),
        params=params,
        opt_state=opt_state,
        rng=rng,
        skipped=jnp.int32(seed + 1),
        bad_streak=jnp.int32(seed % 2),
    )


def _raw(x: jax.Array) -> jax.Array:
    return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x


def assert_same_state(got: TrainState, want: TrainState) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(_raw(g)), np.asarray(_raw(w)))


def abstract(typed_key: bool = True) -> TrainState:
    return jax.eval_shape(lambda: make_state(0, typed_key=typed_key))


DATA = {"epoch": 2, "position": 1234, "files": ["a.txt", "b.txt"], "nested": {"seed": 7}}
META = {"model": {"d_model": 64, "preset": "tiny"}, "lr": 3e-4, "note": None}


@pytest.mark.parametrize("typed_key", [True, False])
def test_roundtrip_is_bit_identical(tmp_path: Path, typed_key: bool) -> None:
    state = make_state(3, typed_key=typed_key)
    with Checkpointer(tmp_path / "ckpt", async_save=False) as ckpt:
        assert ckpt.save(3, state, data_state=DATA, metadata=META)
        assert ckpt.all_steps() == [3] and ckpt.latest_step() == 3
        got, data, meta = ckpt.restore(abstract(typed_key))
    assert_same_state(got, state)
    assert data == DATA and meta == META


def test_none_data_state_and_metadata(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(0, make_state(0))
        _, data, meta = ckpt.restore(abstract())
    assert data is None and meta is None


def test_keep_last_n(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, keep=2) as ckpt:
        for step in range(5):
            ckpt.save(step, make_state(step))
        ckpt.wait()
        assert ckpt.all_steps() == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["3", "4"]


def test_async_save_wait_restore(tmp_path: Path) -> None:
    state = make_state(5)
    with Checkpointer(tmp_path, async_save=True) as ckpt:
        assert ckpt.save(5, state, data_state=DATA, metadata=META)
        ckpt.wait()
        assert ckpt.latest_step() == 5
        got, data, meta = ckpt.restore(abstract())
    assert_same_state(got, state)
    assert (data, meta) == (DATA, META)


def test_save_interval_and_force(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, save_interval_steps=2, async_save=False) as ckpt:
        saved = [ckpt.save(s, make_state(s)) for s in (1, 2, 3)]
        assert saved == [True, True, False]  # Orbax always saves into an empty directory
        assert ckpt.save(3, make_state(3), force=True)
        assert ckpt.all_steps() == [1, 2, 3]


def test_read_metadata_does_not_touch_arrays(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, make_state(1), metadata={"v": 1})
        ckpt.save(2, make_state(2), metadata={"v": 2})
        shutil.rmtree(tmp_path / "2" / "state")
        assert ckpt.read_metadata() == {"v": 2}
        assert ckpt.read_metadata(1) == {"v": 1}
        with pytest.raises(FileNotFoundError, match="step 9"):
            ckpt.read_metadata(9)


def _delete_array_metadata(step_dir: Path) -> None:
    (step_dir / "state" / "_METADATA").unlink()


def _truncate_array_data(step_dir: Path) -> None:
    for f in (step_dir / "state" / "d").iterdir():
        os.truncate(f, f.stat().st_size // 2)


def _delete_json_metadata(step_dir: Path) -> None:
    (step_dir / "metadata" / "metadata").unlink()


@pytest.mark.parametrize(
    "corrupt", [_delete_array_metadata, _truncate_array_data, _delete_json_metadata]
)
def test_corrupted_latest_falls_back(tmp_path: Path, corrupt) -> None:
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, make_state(step), data_state={"pos": step})
        corrupt(tmp_path / "3")
        with pytest.raises(Exception):  # noqa: B017 - whatever Orbax raises
            ckpt.restore(abstract(), step=3)
        with pytest.warns(RuntimeWarning, match="step 3"):
            got, data, _ = ckpt.restore_latest_valid(abstract())
        assert_same_state(got, make_state(2))
        assert data == {"pos": 2}
        assert ckpt.latest_step() == 3  # not quarantined: readers never modify the directory


def test_quarantine_lets_a_resumed_run_save_again(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, make_state(step))
        _truncate_array_data(tmp_path / "3")
        with pytest.warns(RuntimeWarning, match="step 3"):
            got, _, _ = ckpt.restore_latest_valid(abstract(), quarantine=True)
        assert_same_state(got, make_state(2))
        assert ckpt.all_steps() == [1, 2]
        assert [p.name.split(".")[0] for p in tmp_path.glob("3.invalid-*")] == ["3"]
        assert ckpt.save(3, make_state(33))
        assert_same_state(ckpt.restore(abstract())[0], make_state(33))


def test_unfinalised_tmp_dir_is_ignored(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, make_state(1))
        # What a kill mid-save leaves behind: an incomplete `<step>.orbax-checkpoint-tmp`.
        tmp = tmp_path / "2.orbax-checkpoint-tmp"
        shutil.copytree(tmp_path / "1", tmp)
        shutil.rmtree(tmp / "state" / "d")
        assert ckpt.all_steps() == [1]
        got, _, _ = ckpt.restore_latest_valid(abstract())
        assert_same_state(got, make_state(1))
        assert ckpt.save(2, make_state(2))  # Orbax replaces the stale tmp dir
        assert ckpt.all_steps() == [1, 2] and not tmp.exists()


def test_nothing_to_restore(tmp_path: Path) -> None:
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        assert ckpt.restore_latest_valid(abstract()) == (None, None, None)
        with pytest.raises(FileNotFoundError):
            ckpt.restore(abstract())


def test_all_corrupted_raises(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        for step in (1, 2):
            ckpt.save(step, make_state(step))
            _delete_array_metadata(tmp_path / str(step))
        # one error naming every step tried (no warning per step: nothing was restored)
        with pytest.raises(NoValidCheckpointError, match="step 1") as err:
            ckpt.restore_latest_valid(abstract())
        assert "2" in str(err.value)


def test_directory_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        Checkpointer(a_file)
    with pytest.raises(ValueError, match="not a directory"):
        Checkpointer(a_file / "sub")
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(tmp_path / "k", keep=0)
    monkeypatch.chdir(tmp_path)
    with Checkpointer("rel") as ckpt:
        assert ckpt.directory == tmp_path / "rel" and ckpt.directory.is_absolute()


def test_rejects_non_json(tmp_path: Path) -> None:
    with (
        Checkpointer(tmp_path) as ckpt,
        pytest.raises(TypeError, match="metadata must be JSON-serialisable"),
    ):
        ckpt.save(0, make_state(0), metadata={"x": object()})


_RESHARD_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    sys.path.insert(0, sys.argv[2])
    from test_checkpoint import make_state, assert_same_state
    from arjax.train.checkpoint import Checkpointer

    assert jax.device_count() == 8, jax.devices()
    state = make_state(4)

    def place(mesh, w_spec, b_spec):
        def sharding(x):
            spec = {(16, 8): w_spec, (8,): b_spec}.get(x.shape, P())
            return NamedSharding(mesh, spec)
        return jax.tree.map(sharding, state)

    src = place(jax.make_mesh((8,), ("d",)), P("d", None), P("d"))
    saved = jax.device_put(state, src)
    assert saved.params["w"].sharding == src.params["w"]
    with Checkpointer(sys.argv[1]) as ckpt:
        ckpt.save(4, saved, metadata={"mesh": [8]})
        ckpt.wait()
    dst = place(jax.make_mesh((2, 4), ("a", "b")), P("b", "a"), P("a"))
    abstract = jax.eval_shape(lambda: make_state(0))
    with Checkpointer(sys.argv[1]) as ckpt:
        got, _, meta = ckpt.restore(abstract, shardings=dst)
    assert_same_state(got, state)
    assert meta == {"mesh": [8]}
    for leaf, want in zip(jax.tree.leaves(got), jax.tree.leaves(dst)):
        assert leaf.sharding == want, (leaf.sharding, want)
    assert dict(got.params["w"].sharding.mesh.shape) == {"a": 2, "b": 4}
    print("OK")
    """
)


def test_restore_onto_different_mesh(tmp_path: Path) -> None:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    proc = subprocess.run(
        [sys.executable, "-c", _RESHARD_SCRIPT, str(tmp_path), str(Path(__file__).parent)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]
