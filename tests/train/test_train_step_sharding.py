"""Train step: identical results on 1 device and on an 8-device data x fsdp x tensor mesh;
microbatch accumulation equals one big batch; mesh and sharding-rule validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import standin
from efficient_mllm.train import mesh as mesh_lib
from efficient_mllm.train import optim, sharding as shd, step as step_lib

# fp32 everywhere; reductions are reordered across devices, so allow float rounding only.
RTOL, ATOL = 1e-5, 1e-6


def _run(mesh_cfg, devices, *, microbatches=1, steps=3, compute_dtype="float32"):
    tx, sched = optim.make_optimizer(dict(lr=1e-2, steps=10, warmup_steps=2, weight_decay=0.1))
    mesh = mesh_lib.make_mesh(mesh_cfg, devices)
    rules = shd.make_rules(mesh_axes=mesh_lib.MESH_AXES)
    graphdef, state, shardings = step_lib.init_train_state(standin.make_model, tx, mesh, rules, seed=0)
    fn = step_lib.make_train_step(graphdef, tx, schedule=sched, microbatches=microbatches,
                                  compute_dtype=compute_dtype)
    b0 = standin.make_batch(0)
    keys = {k: b0[k].ndim for k in ("tokens", "loss_mask", "lengths", "image")}
    jstep = step_lib.jit_train_step(fn, shardings, mesh, rules, keys)
    losses = []
    for i in range(steps):
        b = {k: v for k, v in standin.make_batch(i).items() if k in keys}
        state, m = jstep(state, shd.shard_batch(b, mesh, rules))
        losses.append(float(m["loss"]))
    return losses, state


def test_eight_device_mesh_matches_one_device():
    assert jax.device_count() == 8
    l1, s1 = _run(None, jax.devices()[:1])
    l8, s8 = _run({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())
    np.testing.assert_allclose(l8, l1, rtol=RTOL, atol=ATOL)
    # parameters really are sharded on the 8-device mesh
    assert s8.params["blocks"][0]["up"].sharding.spec == P("fsdp", "tensor")
    assert s8.opt_state[1][0].mu["blocks"][0]["up"].sharding.spec == P("fsdp", "tensor")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL),
                 s8.params, s1.params)
    assert int(s8.step) == 3
    # losses change from step to step (the comparison is not vacuous)
    assert len(set(np.round(l1, 4))) == 3


def test_microbatch_accumulation_equals_full_batch():
    l1, s1 = _run({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices(), microbatches=1)
    l4, s4 = _run({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices(), microbatches=2)
    np.testing.assert_allclose(l4, l1, rtol=RTOL, atol=ATOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL),
                 s4.params, s1.params)


def test_bf16_compute_keeps_fp32_params():
    losses, state = _run(None, jax.devices()[:1], compute_dtype="bfloat16")
    assert all(np.isfinite(losses))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    ref, _ = _run(None, jax.devices()[:1])
    np.testing.assert_allclose(losses[0], ref[0], rtol=2e-2)  # bf16 rounding only


def test_mesh_shape_resolution_and_errors():
    assert mesh_lib.mesh_shape({"data": -1}, 8) == {"data": 8, "fsdp": 1, "tensor": 1, "seq": 1}
    assert mesh_lib.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8)["fsdp"] == 2
    with pytest.raises(ValueError, match="model"):
        mesh_lib.mesh_shape({"model": 2}, 8)
    with pytest.raises(ValueError, match="at most one"):
        mesh_lib.mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="does not divide"):
        mesh_lib.mesh_shape({"data": 3, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="multiply to 4"):
        mesh_lib.mesh_shape({"data": 4}, 8)
    with pytest.raises(ValueError, match="mesh.tensor"):
        mesh_lib.mesh_shape({"tensor": 0}, 8)


def test_logical_to_spec_rules():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = shd.make_rules(mesh_axes=mesh_lib.MESH_AXES)
    assert shd.logical_to_spec(("embed", "mlp"), (8, 16), mesh, rules) == P("fsdp", "tensor")
    # a dimension that does not divide stays replicated along that axis
    assert shd.logical_to_spec(("vocab", "embed"), (37, 8), mesh, rules) == P(None, "fsdp")
    # one mesh axis is used at most once per array
    assert shd.logical_to_spec(("mlp", "heads"), (4, 4), mesh, rules) == P("tensor")
    assert shd.batch_spec(2, mesh, rules) == P(("data", "fsdp"))
    with pytest.raises(ValueError, match="'layers'"):
        shd.logical_to_spec(("layers", "embed"), (2, 8), mesh, rules, where="w")
    with pytest.raises(ValueError, match="expected one per dimension"):
        shd.logical_to_spec(("embed",), (2, 8), mesh, rules)
    with pytest.raises(ValueError, match="'model'"):
        shd.make_rules({"embed": "model"}, mesh_lib.MESH_AXES)
    custom = shd.make_rules({"embed": "", "batch": "data"}, mesh_lib.MESH_AXES)
    assert shd.logical_to_spec(("embed", "mlp"), (8, 16), mesh, custom) == P(None, "tensor")


def test_shard_batch_rejects_indivisible_batch():
    mesh = mesh_lib.make_mesh({"data": 8})
    rules = shd.make_rules(mesh_axes=mesh_lib.MESH_AXES)
    with pytest.raises(ValueError, match="multiple of 8"):
        shd.shard_batch({"tokens": np.zeros((6, 4), np.int32)}, mesh, rules)
