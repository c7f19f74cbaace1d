"""The core says each thing once: it stays one small loadable file, the Balancing Act arguments are declared once
(`GuidanceArguments`, whose defaults every pipeline's `__call__` repeats in its explicit signature) and documented once
(`GUIDANCE_ARGS_DOCSTRING`, inserted in every pipeline's `__call__` docstring)."""

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

import pipeline_balancing_act as pba
from pipeline_balancing_act_unconditional import (
    DEFAULT_UNCONDITIONAL_GUIDANCE_STRENGTH,
    BalancingActUnconditionalPipeline,
)
from pipeline_balancing_act_xl import BalancingActXLPipeline


CORE_FILE = Path(__file__).resolve().parent.parent / "pipeline_balancing_act.py"
# A ratchet: the core may shrink, never grow back (lower it when it shrinks).
MAX_CORE_LINES = 1771
PIPELINES = [pba.BalancingActPipeline, BalancingActUnconditionalPipeline, BalancingActXLPipeline]
# The pipelines with classifier-free guidance: they take `guided_branches`.
CFG_PIPELINES = (pba.BalancingActPipeline, BalancingActXLPipeline)


def test_the_core_file_stays_small():
    assert len(CORE_FILE.read_text().splitlines()) <= MAX_CORE_LINES


def shared_entries() -> dict[str, list[str]]:
    """The entries of `GUIDANCE_ARGS_DOCSTRING` by argument name, as lines (placeholders left in)."""
    entries = re.split(r"\n(?=\s{12}\S)", pba.GUIDANCE_ARGS_DOCSTRING.strip("\n"))
    return {entry.split()[0]: entry.splitlines() for entry in entries}


def test_the_shared_docstring_documents_every_guidance_argument_once():
    assert list(shared_entries()) == pba.GuidanceArguments.names()


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: p.__name__)
def test_every_pipeline_call_documents_the_guidance_arguments_it_takes_from_the_shared_docstring(pipeline):
    doc = pipeline.__call__.__doc__
    parameters = inspect.signature(pipeline.__call__).parameters
    assert "{" not in doc and "}" not in doc  # every pipeline-specific word filled in
    for name, lines in shared_entries().items():
        if name not in parameters:
            assert f"{name} (" not in doc
            continue
        assert doc.count(f"            {name} (") == 1, name
        for line in lines:
            if "{" not in line:
                assert line in doc, (name, line)
    assert doc.index("Args:") < doc.index("h_classifier (") < doc.index("Examples:") < doc.index("Returns:")


def test_the_unconditional_pipeline_documents_its_arguments_without_classifier_free_guidance():
    doc = BalancingActUnconditionalPipeline.__call__.__doc__
    assert "guided_branches" not in doc and "plain DDIMPipeline, bit-for-bit" in doc
    assert "`len == batch_size`" in doc and "w is 1 (there is no classifier-free guidance)" in doc
    # its own default strength (chosen on the toy DDPM), named in its docstring; the others keep the core's
    default = inspect.signature(BalancingActUnconditionalPipeline.__call__).parameters["guidance_strength"].default
    assert default == DEFAULT_UNCONDITIONAL_GUIDANCE_STRENGTH != pba.DEFAULT_GUIDANCE_STRENGTH
    assert "defaults to `DEFAULT_UNCONDITIONAL_GUIDANCE_STRENGTH`" in doc
    for pipeline in (pba.BalancingActPipeline, BalancingActXLPipeline):
        assert (
            inspect.signature(pipeline.__call__).parameters["guidance_strength"].default
            == pba.DEFAULT_GUIDANCE_STRENGTH
        )
        assert "defaults to `DEFAULT_GUIDANCE_STRENGTH`" in pipeline.__call__.__doc__
    assert "vanilla Stable Diffusion, bit-for-bit" in pba.BalancingActPipeline.__call__.__doc__


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: p.__name__)
def test_every_pipeline_call_takes_the_guidance_arguments_with_the_declared_defaults(pipeline):
    parameters = inspect.signature(pipeline.__call__).parameters
    for field in dataclasses.fields(pba.GuidanceArguments):
        if field.init and field.name in parameters:
            # the unconditional pipeline's own strength default: checked in the test of its docstring
            own = pipeline is BalancingActUnconditionalPipeline and field.name == "guidance_strength"
            assert parameters[field.name].default == (
                DEFAULT_UNCONDITIONAL_GUIDANCE_STRENGTH if own else field.default
            )
    taken = [name for name in pba.GuidanceArguments.names() if name in parameters]
    expected = [n for n in pba.GuidanceArguments.names() if pipeline in CFG_PIPELINES or n != "guided_branches"]
    assert taken == expected
