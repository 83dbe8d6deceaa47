"""A catalogue of bad calls on the public entry points: each ends in a named error.

Every case here reached the user as a raw Python/torch error (``RuntimeError: mat1 and mat2
shapes cannot be multiplied``, ``AssertionError: Torch not compiled with CUDA``, ``'int' object is
not iterable``, ``stack expects a non-empty TensorList`` ...), as a misleading one (numpy inputs
"must hold at least one example"), or silently. Now each raises an error of the expected class
whose message names the argument, within a time limit. numpy inputs and targets are accepted
(converted), and give the same numbers as tensors.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Tuple, Type, Union

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from captum_explaind import (
    EPKOptions,
    ExactPathKernel,
    ParameterInfluence,
    PredictionSimilarity,
    StepInfluence,
    TrainingDataInfluence,
)
from captum_explaind.errors import ExplaindError, InvalidInputError, SelectorError

from guard_utils import small_run, time_limit
from training import TanhMLP, loss_fn_for

NLL = loss_fn_for("nll")


class Case(NamedTuple):
    call: Callable[[Any], Any]
    error: Union[Type[BaseException], Tuple[Type[BaseException], ...]]
    match: str


class Ctx(NamedTuple):
    model: nn.Module
    traj: Any
    X: torch.Tensor
    Y: torch.Tensor

    @property
    def ds(self):
        return TensorDataset(self.X, self.Y)

    @property
    def x(self):
        return self.X[:2]


class ByKey(TanhMLP):
    def forward(self, features):  # type: ignore[override]
        return super().forward(features)


def _keyed(c: Ctx) -> nn.Module:
    m = ByKey().double()
    m.load_state_dict(c.model.state_dict())
    return m


CASES = {
    # ---- inputs that do not fit the model: its raw error wrapped, the argument named
    "wrong-feature-dim": Case(lambda c: ExactPathKernel(c.model, c.traj).reconstruct(torch.randn(3, 7).double()),
                              InvalidInputError, r"inputs do not fit the model.*\(3, 7\).*mat1 and mat2"),
    "wrong-feature-dim-view": Case(lambda c: ParameterInfluence(c.model, c.traj).attribute(torch.randn(2, 4), target=0),
                                   InvalidInputError, r"inputs do not fit the model.*feature dimension"),
    "integer-inputs-for-a-float-model": Case(
        lambda c: StepInfluence(c.model, c.traj).attribute(torch.ones(2, 5, dtype=torch.long), target=0),
        InvalidInputError, r"inputs do not fit the model.*int64"),
    "complex-inputs": Case(lambda c: ExactPathKernel(c.model, c.traj).reconstruct(c.x.to(torch.complex128)),
                           InvalidInputError, r"inputs do not fit the model.*complex128"),
    "one-example-without-its-axis": Case(lambda c: ExactPathKernel(c.model, c.traj).reconstruct(c.X[0]),
                                         InvalidInputError, r"inputs: .*one row per example.*unsqueeze\(0\)"),
    "mapping-with-a-wrong-key": Case(lambda c: ExactPathKernel(_keyed(c), c.traj).reconstruct({"feats": c.x}),
                                     InvalidInputError, r"inputs do not fit the model.*'feats'.*unexpected keyword"),
    "extra-forward-args-the-model-does-not-take": Case(
        lambda c: ExactPathKernel(c.model, c.traj).reconstruct(c.x, additional_forward_args=(c.x,)),
        InvalidInputError, r"inputs do not fit the model.*positional argument"),
    "others-with-a-wrong-feature-dim": Case(
        lambda c: PredictionSimilarity(c.model, c.traj, c.ds, NLL).attribute(c.x, torch.randn(2, 7).double(), target=0),
        InvalidInputError, r"others do not fit the model"),
    "output_fn-that-fails": Case(
        lambda c: ExactPathKernel(c.model, c.traj, output_fn=lambda o: o.logits).reconstruct(c.x),
        InvalidInputError, r"\(then output_fn\) raised AttributeError.*logits"),
    "inputs-with-zero-examples": Case(lambda c: ExactPathKernel(c.model, c.traj).reconstruct(c.X[:0]),
                                      ValueError, r"inputs must hold at least one example: its example axis"),
    # ---- training data and losses
    "float-labels-for-nll": Case(
        lambda c: TrainingDataInfluence(c.model, c.traj, TensorDataset(c.X, c.Y.double()), NLL),
        InvalidInputError, r"train_dataset / loss_fn: RuntimeError.*target dtype"),
    "training-features-of-the-wrong-dim": Case(
        lambda c: TrainingDataInfluence(c.model, c.traj, TensorDataset(c.X[:, :4], c.Y), NLL),
        InvalidInputError, r"train_dataset / loss_fn: .*mat1 and mat2"),
    "similarity-training-features-of-the-wrong-dim": Case(
        lambda c: PredictionSimilarity(c.model, c.traj, TensorDataset(c.X[:, :4], c.Y), NLL),
        InvalidInputError, r"train_dataset / loss_fn"),
    "a-loss-class-instead-of-a-loss": Case(lambda c: TrainingDataInfluence(c.model, c.traj, c.ds, nn.CrossEntropyLoss),
                                           TypeError, r"loss_fn is the class CrossEntropyLoss.*instance"),
    "train_subset-of-ten-million": Case(
        lambda c: PredictionSimilarity(c.model, c.traj, c.ds, NLL).attribute(c.x, target=0, train_subset=range(10**7)),
        ValueError, r"train_subset must be a sequence of at most 24"),
    # ---- layer and parameter selections
    "layers-empty-mapping": Case(lambda c: ParameterInfluence(c.model, c.traj).attribute(c.x, target=0, layers={}),
                                 ValueError, r"layers is an empty mapping"),
    "layers-empty-group": Case(
        lambda c: StepInfluence(c.model, c.traj).attribute(c.x, target=0, layers={"a": "fc1", "b": []}),
        ValueError, r"layers\['b'\] is empty"),
    "layers-an-int": Case(lambda c: ParameterInfluence(c.model, c.traj).attribute(c.x, target=0, layers=3),
                          TypeError, r"layers must be a name, glob, module or parameter.*got int"),
    "layers-an-int-step-view": Case(lambda c: StepInfluence(c.model, c.traj).attribute(c.x, target=0, layers=3),
                                    TypeError, r"layers must be"),
    "layers-an-int-data-view": Case(
        lambda c: TrainingDataInfluence(c.model, c.traj, c.ds, NLL).attribute(c.x, target=0, layers=3),
        TypeError, r"layers must be"),
    "layers-unknown-name": Case(lambda c: ParameterInfluence(c.model, c.traj).attribute(c.x, target=0, layers=["enc"]),
                                SelectorError, r"^'enc' is neither a parameter nor a module of the model$"),
    "parameters-an-int": Case(lambda c: ExactPathKernel(c.model, c.traj, parameters=3),
                              TypeError, r"parameters must be a name, glob, module or parameter.*got int"),
    "similarity-layers-an-int": Case(
        lambda c: PredictionSimilarity(c.model, c.traj, c.ds, NLL).attribute(c.x, target=0, layers=3),
        TypeError, r"parameters must be"),
    # ---- constructor arguments
    "trajectory-an-int": Case(lambda c: ExactPathKernel(c.model, 3), TypeError, r"trajectory must be a Trajectory"),
    "trajectory-none-in-a-view": Case(lambda c: ParameterInfluence(c.model, None), TypeError,
                                      r"trajectory must be a Trajectory"),
    "gauss-nodes-a-million": Case(lambda c: ExactPathKernel(c.model, c.traj, nodes=10**6), ValueError,
                                  r"nodes=1000000 is more than 128 for quadrature='gauss'"),
    "midpoint-nodes-a-hundred-thousand": Case(
        lambda c: StepInfluence(c.model, c.traj, quadrature="midpoint", nodes=10**5), ValueError,
        r"nodes=100000 is more than 10000 for quadrature='midpoint'"),
    "target-a-float": Case(lambda c: ParameterInfluence(c.model, c.traj).attribute(c.x, target=0.5),
                           TypeError, r"target must be None, an int.*got float"),
    "target-a-string": Case(lambda c: StepInfluence(c.model, c.traj).attribute(c.x, target="cat"),
                            TypeError, r"target must be None, an int.*got str"),
}

CUDA_CASES = {
    "device-cuda-keyword": Case(lambda c: ExactPathKernel(c.model, c.traj, device="cuda"),
                                ValueError, r"device='cuda', but CUDA is not available"),
    "device-cuda-in-options": Case(lambda c: StepInfluence(c.model, c.traj, EPKOptions(device="cuda:0")),
                                   ValueError, r"device='cuda:0', but CUDA is not available"),
    "device-cuda-data-view": Case(lambda c: TrainingDataInfluence(c.model, c.traj, c.ds, NLL, device="cuda"),
                                  ValueError, r"device='cuda'"),
}

RAW = (RuntimeError, AssertionError, AttributeError, NotImplementedError)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    model, traj, X, Y = small_run(tmp_path_factory.mktemp("bad") / "run", optimizer="sgd_momentum", steps=3)
    return Ctx(model, traj, X, Y)


def _check(case: Case, c: Ctx) -> None:
    with time_limit(30), pytest.raises(case.error, match=case.match) as info:
        case.call(c)
    err = info.value
    # named: a library error, or a built-in one that is not a raw runtime failure
    assert isinstance(err, ExplaindError) or not isinstance(err, RAW), repr(err)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_call_is_named(ctx, name):
    _check(CASES[name], ctx)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA build with a GPU accepts device='cuda'")
@pytest.mark.parametrize("name", list(CUDA_CASES))
def test_cuda_device_on_a_cpu_build_is_named(ctx, name):
    _check(CUDA_CASES[name], ctx)


# ----------------------------------------------------------------------------- numpy is accepted
def test_numpy_inputs_and_targets_are_accepted(ctx):
    c = ctx
    xn, yn = c.X[:3].numpy(), c.Y[:3].numpy()
    epk = ExactPathKernel(c.model, c.traj)
    torch.testing.assert_close(epk.reconstruct(xn).final, epk.reconstruct(c.X[:3]).final, rtol=0, atol=0)
    pi = ParameterInfluence(c.model, c.traj)
    for target in (yn, np.int64(1), list(yn)):
        want = torch.as_tensor(target) if not isinstance(target, list) else c.Y[:3]
        got = pi.attribute(xn, target=target, layers=["fc1", "fc2"])
        torch.testing.assert_close(got, pi.attribute(c.X[:3], target=want, layers=["fc1", "fc2"]), rtol=0, atol=0)
    tdi = TrainingDataInfluence(c.model, c.traj, c.ds, NLL)
    torch.testing.assert_close(tdi.influence((xn, yn)), tdi.influence((c.X[:3], c.Y[:3])), rtol=0, atol=0)
    # float32 numpy arrays take the compute dtype like float32 tensors
    torch.testing.assert_close(epk.reconstruct(xn.astype(np.float32)).final,
                               epk.reconstruct(c.X[:3].float()).final, rtol=0, atol=0)
