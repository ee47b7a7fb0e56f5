"""The engine and daemon use what the bundle says about the family: the 70B Instruct
chat format built exactly as its template and stopped at `<step>`, a warning for
chat on a base model, infill refused without the tokens, the family facts in the
status, old bundles without the `family` section, and the memory check."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer

import torch_reference
from edge_runtime.bundle import MANIFEST_NAME, load_bundle
from edge_runtime.engine import Engine
from edge_runtime.errors import UnsupportedMode
from edge_runtime.memory_fit import MemoryBudgetExceeded, bundle_plan
from edge_runtime.profiles import load_profile
from edge_runtime.protocol import encode_status, final_dict
from edge_runtime.types import GenerationRequest, Message, SamplingParams

GREEDY = SamplingParams(temperature=0.0)
STEP_ID = 32015


@pytest.fixture(scope="module")
def step_engine(step_bundle):
    return Engine.from_bundle(step_bundle)


def chat_request(pairs, max_tokens: int = 16) -> GenerationRequest:
    return GenerationRequest(mode="chat", messages=tuple(Message(r, c) for r, c in pairs), max_tokens=max_tokens,
                             sampling=GREEDY)


# ------------------------------------------------------------------------- 70B Instruct
def test_step_bundle_records_the_family(step_bundle):
    manifest = json.loads((step_bundle / MANIFEST_NAME).read_text())
    fam = manifest["family"]
    assert fam["size_class"] == "custom" and fam["parameter_count"] > 0
    assert fam["variant"] == "instruct" and fam["variant_source"] == "folder name 'CodeLlama-70b-Instruct-hf'"
    assert fam["attention"] == {"kind": "GQA", "num_heads": 16, "num_kv_heads": 8}
    assert fam["chat_format"] == "source-step" and fam["chat_format_source"] == "chat template"
    assert fam["step_token"] is True and manifest["tokenizer"]["step"] == STEP_ID
    assert manifest["format_version"] == 1
    bundle = load_bundle(step_bundle)
    assert bundle.family.variant == "instruct" and bundle.chat_format == "source-step"


def test_source_step_prompt_ids_equal_the_template_and_a_hand_built_reference(step_engine, step_checkpoint):
    from transformers import AutoTokenizer

    pairs = (("system", "Be terse. "), ("user", " Sort a list "), ("assistant", "sorted(x)"), ("user", "In place?\n"))
    ours = step_engine.plan(chat_request(pairs)).ids
    # by hand, from codellama-formats.md: <s>, then per message encode("Source: role\n\n content") + <step>
    raw = Tokenizer.from_file(str(step_checkpoint / "tokenizer.json"))
    raw.encode_special_tokens = True

    def enc(text: str) -> list[int]:
        return raw.encode(text, add_special_tokens=False).ids

    expected = [1]
    for role, content in pairs:
        expected += enc(f"Source: {role}\n\n {content.strip()}") + [STEP_ID]
    expected += enc("Source: assistant\nDestination: user\n\n ")
    assert ours == expected
    # and the checkpoint's own chat template, rendered and tokenized by transformers
    hf = AutoTokenizer.from_pretrained(str(step_checkpoint))
    rendered = hf.apply_chat_template([{"role": r, "content": c} for r, c in pairs], tokenize=False)
    assert hf(rendered, add_special_tokens=False)["input_ids"] == ours


def test_step_stops_generation(step_engine, step_checkpoint, step_dialog):
    dialog, at = step_dialog
    result = step_engine.complete(chat_request(dialog, max_tokens=16))
    ids = list(result.prompt_token_ids)
    unstopped = torch_reference.greedy(step_checkpoint, ids, 16)
    cut = unstopped.index(STEP_ID)
    assert cut >= at  # the rigged checkpoint says <step> after a few tokens
    assert result.finish_reason == "stop" and list(result.token_ids) == unstopped[:cut]
    assert STEP_ID not in result.token_ids and "<step>" not in result.text
    assert result.warnings == ()  # chat on an Instruct model


def test_status_reports_the_family_facts(step_engine):
    status = json.loads(encode_status("online", device_id="d", model_info=step_engine.info, queue_depth=0,
                                      queue_limit=4, version="x"))
    fam = status["family"]
    assert fam["variant"] == "instruct" and fam["size_class"] == "custom"
    assert fam["attention"] == "GQA" and (fam["num_heads"], fam["num_kv_heads"]) == (16, 8)
    assert fam["chat_format"] == status["chat_format"] == "source-step"
    assert fam["memory"]["budget_bytes"] == load_profile("cpu-x86_64").memory_budget_bytes
    assert fam["memory"]["context"] == status["context_limit"]
    assert fam["memory"]["kv_dtype"] == "float32"  # an fp32 bundle keeps a float cache under every profile


# ------------------------------------------------------------------------ base, no infill
def test_chat_on_a_base_model_works_with_a_warning(noinfill_bundle):
    engine = Engine.from_bundle(noinfill_bundle)
    assert engine.bundle.family.variant == "base"
    result = engine.complete(chat_request((("user", "Reverse a list"),), max_tokens=2))
    assert result.usage.completion_tokens >= 1
    assert len(result.warnings) == 1 and "not instruction-tuned" in result.warnings[0]
    assert final_dict("r1", result)["warnings"] == list(result.warnings)
    completion = engine.complete(GenerationRequest(mode="complete", prompt="x", max_tokens=1, sampling=GREEDY))
    assert completion.warnings == ()


def test_infill_is_refused_with_a_clear_error_without_the_tokens(noinfill_bundle):
    engine = Engine.from_bundle(noinfill_bundle)
    assert engine.info.family["supports_infill"] is False and "lacks" in engine.info.family["infill_note"]
    with pytest.raises(UnsupportedMode, match=r"infill is not available on tiny-noinfill: the tokenizer lacks"):
        engine.plan(GenerationRequest(mode="infill", prefix="a", suffix="b"))


def test_bundle_without_family_section_still_loads(tiny_bundle, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    manifest = json.loads((old / MANIFEST_NAME).read_text())
    del manifest["family"]
    (old / MANIFEST_NAME).write_text(json.dumps(manifest))
    bundle = load_bundle(old)
    assert bundle.family.variant == "unknown" and bundle.family.size_class == "custom"
    assert bundle.supports_infill and bundle.family.attention == "GQA"
    engine = Engine.from_bundle(old)
    result = engine.complete(chat_request((("user", "hi"),), max_tokens=1))
    assert result.warnings == ()  # variant unknown: no warning


def test_inconsistent_family_section_is_refused(tiny_bundle, tmp_path):
    from edge_runtime.errors import BundleError

    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    manifest = json.loads((bad / MANIFEST_NAME).read_text())
    manifest["family"]["chat_format"] = "source-step"
    (bad / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="family.chat_format"):
        load_bundle(bad)


# ------------------------------------------------------------------------------- memory
def small_profile(tmp_path: Path, budget: int) -> Path:
    text = (Path(__file__).resolve().parents[2] / "device_profiles" / "cpu-x86_64.toml").read_text()
    text = text.replace('name = "cpu-x86_64"', 'name = "tiny-board"')
    lines = [f"memory_budget_bytes = {budget}" if line.startswith("memory_budget_bytes") else line
             for line in text.splitlines()]
    path = tmp_path / "tiny-board.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bundle_plan_adds_weights_kv_and_overhead(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    profile = load_profile("cpu-x86_64")
    plan = bundle_plan(bundle, profile)
    arch = bundle.architecture
    graph_files = [f for f in tiny_bundle.iterdir() if f.name.startswith("model.onnx")]
    assert plan.weights_bytes == sum(f.stat().st_size for f in graph_files)
    assert plan.context == min(bundle.context_limit, profile.max_context)
    # float32; the fused graph shares one buffer between past and present, the optimum graph needs two
    buffers = 1 if bundle.graph_flavour == "gqa-shared-kv" else 2
    assert plan.kv_cache_bytes == buffers * 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * plan.context * 4
    assert plan.overhead_bytes > 0 and plan.fits
    assert plan.total_bytes == plan.weights_bytes + plan.kv_cache_bytes + plan.overhead_bytes


def test_too_small_a_budget_refuses_to_start_with_the_numbers(tiny_bundle, tmp_path):
    profile = small_profile(tmp_path, 64 * 1024 * 1024)
    with pytest.raises(MemoryBudgetExceeded) as err:
        Engine.from_bundle(tiny_bundle, profile)
    plan = err.value.plan
    message = str(err.value)
    assert not plan.fits and plan.budget_bytes == 64 * 1024 * 1024
    for word in ("weights", "KV cache", "overhead", "memory budget", "0.06 GiB", f"{plan.context} tokens"):
        assert word in message
    # the command line says the same in one line, exit 2
    out = subprocess.run([sys.executable, "-m", "edge_runtime", "generate", "--bundle", str(tiny_bundle),
                          "--profile", str(profile), "--prompt", "x", "--max-tokens", "1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "does not fit" in out.stderr
    assert out.stderr.count("\n") == 1


def test_serve_refuses_a_bundle_over_budget_unless_the_config_turns_the_check_off(tiny_bundle, tmp_path):
    """`edge-runtime serve` stops at start with the numbers; `[model] check_memory = false`
    lets it load (it then waits for the broker, which is not there: we only look at the start)."""
    profile = small_profile(tmp_path, 64 * 1024 * 1024)
    config = tmp_path / "config.toml"
    base = (f'[model]\nbundle = "{tiny_bundle}"\nprofile = "{profile}"\n{{extra}}\n'
            f'[mqtt]\nbroker = "mqtt://127.0.0.1:9"\ndevice_id = "fit1"\n'
            f'[service]\nstate_dir = "{tmp_path / "state"}"\n')
    config.write_text(base.format(extra=""))
    out = subprocess.run([sys.executable, "-m", "edge_runtime", "serve", "--config", str(config)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "does not fit" in out.stderr
    config.write_text(base.format(extra="check_memory = false"))
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime", "--log-level", "INFO", "serve", "--config",
                             str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "model " in line and " on " in line or len(lines) > 200:
                break
        assert any("CPUExecutionProvider" in line for line in lines), lines
    finally:
        proc.kill()
        proc.wait()


CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                   "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                   "{% endif %}")


@pytest.mark.parametrize("template, warned", [(CHATML_TEMPLATE, True), ("llama2", False)], ids=["chatml", "inst"])
def test_chat_on_a_fine_tune_whose_template_is_another_format_says_so(tiny_checkpoint, tmp_path, exporter, template,
                                                                      warned):
    """A fine-tune with a ChatML chat template was taken for an Instruct model in Llama 2's
    [INST] format (the default when the template is neither format), with nothing said at
    export or in the reply; chat prompts are still [INST], and now both say so."""
    from edge_export.synthetic import LLAMA2_CHAT_TEMPLATE

    folder = shutil.copytree(tiny_checkpoint, tmp_path / "fine-tune")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = LLAMA2_CHAT_TEMPLATE if template == "llama2" else template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    bundle = exporter(folder, tmp_path / "b", skip_fidelity=True)
    engine = Engine.from_bundle(bundle)
    assert engine.bundle.family.variant == "instruct" and engine.bundle.chat_format == "llama2"
    chat = engine.plan(chat_request((("user", "Reverse a list."),)))
    said = [w for w in chat.warnings if "chat template is not Code Llama's [INST] format" in w]
    assert bool(said) is warned
    assert not engine.plan(GenerationRequest(mode="complete", prompt="def f():")).warnings
