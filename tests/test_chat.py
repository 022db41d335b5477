"""`python -m rlt.chat`: the conversation and its commands, the settings a run gives, fitting the model's positions,
stopping an answer, and the command line (--prompt answers, a run dir, a LoRA adapter, a terminal session, errors)
with the tiny random model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
import yaml

from rlt.chat import Chatbot, Conversation, Settings, build_parser, fit, parse_command, run_command, settings_for
from rlt.errors import ConfigError
from rlt.generation.sampling import GREEDY, Sampling
from rlt.run_info import locate

REPO = Path(__file__).resolve().parents[1]
RUN_SYSTEM = "You are the tiny run's assistant. Think in <reasoning> tags, then answer in <answer> tags."


def chat_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "rlt.chat", *args]


def run_chat(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(chat_cmd(*args), cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    """The tiny model and tokenizer, loaded once."""
    from rlt.models import load_eval_model

    return load_eval_model(tiny_model_path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_path) -> Path:
    """A run dir as training leaves it, for what `locate` reads: config.yaml and a final/ model (the tiny one)."""
    run = tmp_path_factory.mktemp("chat") / "tiny_run"
    run.mkdir()
    (run / "final").symlink_to(tiny_model_path, target_is_directory=True)
    config = dict(run_name="tiny_run", algorithm="grpo", model_name_or_path="rlt:tiny", system_prompt=RUN_SYSTEM,
                  temperature=0.0, top_p=0.9, top_k=None, min_p=None, repetition_penalty=1.0,
                  max_completion_length=7)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def answers_of(proc: subprocess.CompletedProcess) -> list[dict]:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# ------------------------------------------------------------------------------------------ conversation (pure)


def test_conversation_messages_commands_and_reset():
    conversation = Conversation("Be brief.")
    conversation.add("Hi", "Hello.")
    assert conversation.messages("And you?") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And you?"}]
    assert run_command("/reset", "", conversation)  # forgets the turns, keeps the system prompt
    assert conversation.messages("x") == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"}]
    conversation.add("Hi", "Hello.")
    assert run_command("/system", "Talk like a pirate.", conversation)  # a new system prompt, a new conversation
    assert conversation.messages() == [{"role": "system", "content": "Talk like a pirate."}]
    assert run_command("/system", "", conversation)  # shows it, changes nothing
    assert conversation.system == "Talk like a pirate."
    assert run_command("/system", "-", conversation)
    assert conversation.messages("x") == [{"role": "user", "content": "x"}]
    assert run_command("/nonsense", "", conversation) and run_command("/help", "", conversation)
    assert not run_command("/quit", "", conversation)


def test_parse_command():
    assert parse_command("/system  You are helpful. ") == ("/system", "You are helpful.")
    assert parse_command("/RESET") == ("/reset", "")
    assert parse_command("hello /reset") is None and parse_command("//reset") is None  # //: a message "/reset"


def test_fit_leaves_out_the_oldest_turns_first():
    conversation = Conversation("S", [("1" * 10, "2" * 10), ("3" * 5, "4" * 5), ("5", "6")])

    def chars(messages):
        return sum(len(m["content"]) for m in messages)

    assert fit(conversation, "q", chars, None) == (conversation.messages("q"), 0)
    assert fit(conversation, "q", chars, 24)[1] == 1  # S + 3333344444 + 5 + 6 + q = 14 (<= 24); with turn 1: 34
    messages, skip = fit(conversation, "q", chars, 3)
    assert skip == 3 and [m["content"] for m in messages] == ["S", "q"]
    with pytest.raises(ConfigError, match="too long"):
        fit(conversation, "a long question", chars, 3)


# -------------------------------------------------------------------------------------------------- settings


def test_a_run_dir_gives_its_system_prompt_sampling_and_length(run_dir):
    located = locate(str(run_dir))
    settings = settings_for(located, build_parser().parse_args([str(run_dir)]))
    assert located.model_dir == str(run_dir / "final")
    assert settings == Settings(RUN_SYSTEM, Sampling(temperature=0.0, top_p=0.9), 7)
    flags = build_parser().parse_args([str(run_dir), "--system", "", "--temperature", "0.7", "--top-k", "20",
                                       "--min-p", "0", "--max-new-tokens", "33", "--seed", "3"])
    assert settings_for(located, flags) == Settings(None, Sampling(0.7, top_p=0.9, top_k=20), 33, 3)


def test_a_plain_model_chats_greedily_without_a_system_prompt(tiny_model_path):
    settings = settings_for(locate(tiny_model_path), build_parser().parse_args([tiny_model_path]))
    assert settings == Settings(None, GREEDY, 256)
    with pytest.raises(ConfigError, match="top_p must be in"):
        settings_for(locate(tiny_model_path), build_parser().parse_args([tiny_model_path, "--top-p", "2"]))


def test_the_rendered_prompt_of_a_run_has_its_system_prompt(run_dir, tiny):
    located = locate(str(run_dir))
    bot = Chatbot(*tiny, settings_for(located, build_parser().parse_args([str(run_dir)])))
    conversation = Conversation(bot.settings.system)
    prompt = bot.prompt_for(conversation, "What is 2+3?")
    assert prompt == (f"<|im_start|>system\n{RUN_SYSTEM}<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
                      "<|im_start|>assistant\n")
    conversation.add("What is 2+3?", "5")
    run_command("/system", "Be brief.", conversation)
    assert bot.prompt_for(conversation, "Hi") == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi"
                                                  "<|im_end|>\n<|im_start|>assistant\n")


# ----------------------------------------------------------------------------------------------------- the model


def test_long_conversations_lose_their_oldest_turns(tiny, caplog):
    bot = Chatbot(*tiny, Settings(None, GREEDY, 8))
    conversation = Conversation("S", [(f"question {i} " * 5, f"answer {i} " * 5) for i in range(6)])
    full = bot.count(conversation.messages("last"))
    bot.max_positions = full + 8 - 1  # one token short for the whole conversation and an 8-token answer
    with caplog.at_level("WARNING", logger="rlt.chat"):
        prompt = bot.prompt_for(conversation, "last")
    assert len(conversation.turns) == 5 and "question 0" not in prompt and "question 1" in prompt
    assert "left out the 1 oldest turn" in caplog.text
    assert bot.count(conversation.messages("last")) + 8 <= bot.max_positions
    bot.max_positions = 12
    with pytest.raises(ConfigError, match="too long"):
        bot.prompt_for(conversation, "a question far longer than the twelve positions of this model " * 3)
    assert len(conversation.turns) == 5  # a message that does not fit leaves the conversation as it was


def test_an_answer_streams_and_stops_on_ctrl_c(tiny):
    bot = Chatbot(*tiny, Settings(None, GREEDY, 40))
    conversation = Conversation()
    streamed = []
    answer, interrupted = bot.answer(conversation, "hi", streamed.append)
    assert not interrupted and len(streamed) > 1 and "".join(streamed) == answer  # piece by piece
    assert conversation.turns == [("hi", answer)]

    pieces = []

    def ctrl_c_at_the_second_piece(piece):
        pieces.append(piece)
        if len(pieces) == 2:
            raise KeyboardInterrupt

    bot.settings = Settings(None, GREEDY, 1000)
    stopped, interrupted = bot.answer(conversation, "hi", ctrl_c_at_the_second_piece)
    tokens = len(tiny[1](stopped, add_special_tokens=False)["input_ids"])
    assert interrupted and stopped == "".join(pieces) and tokens < 20  # generation ended at once, not at 1000
    assert conversation.turns[-1] == ("hi", stopped)  # what was shown stays in the conversation


def test_a_model_without_a_chat_template_is_refused(tiny):
    model, tokenizer = tiny
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(ConfigError, match="no chat template"):
            Chatbot(model, tokenizer, Settings(None, GREEDY, 8))
    finally:
        tokenizer.chat_template = template
    with pytest.raises(ConfigError, match="leaves no room"):
        Chatbot(model, tokenizer, Settings(None, GREEDY, 4096))


# ---------------------------------------------------------------------------------------------- the command line


def test_prompts_answer_one_conversation_deterministically(tiny_model_path, tiny):
    args = ["rlt:tiny", "--prompt", "What is 2+3?", "--prompt", "And then?", "--temperature", "0",
            "--max-new-tokens", "12", "--json"]
    procs = [subprocess.Popen(chat_cmd(*args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    (out1, err1), (out2, _) = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], err1
    turns = json.loads(out1)
    assert out1 == out2 and [t["user"] for t in turns] == ["What is 2+3?", "And then?"]
    assert err1.splitlines() == ["rlt.chat: rlt:tiny | no run | system prompt: none | greedy | max_new_tokens 12"]

    bot = Chatbot(*tiny, Settings(None, GREEDY, 12))  # the second answer followed the first: one conversation
    conversation = Conversation()
    for turn in turns:
        assert bot.answer(conversation, turn["user"], lambda _piece: None)[0] == turn["assistant"]


def test_a_run_dir_chats_as_the_run_did(run_dir, tiny):
    proc = run_chat(str(run_dir), "--prompt", "What is 2+3?")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        f"rlt.chat: {run_dir}/final | run tiny_run ({run_dir}) | system prompt: \"{RUN_SYSTEM[:57]}...\" | greedy | "
        "max_new_tokens 7"]
    located = locate(str(run_dir))  # the answer is the one to the run's system prompt, 7 tokens at most
    bot = Chatbot(*tiny, settings_for(located, build_parser().parse_args([str(run_dir)])))
    expected = bot.answer(Conversation(RUN_SYSTEM), "What is 2+3?", lambda _piece: None)[0]
    assert proc.stdout == expected + "\n"  # the answer alone on stdout, as it streamed


def test_a_lora_adapter_loads_on_its_base(tmp_path, tiny_model_path, tiny):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    adapter = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "adapter")  # adapter_config.json names the tiny model dir as its base
    (turn,) = answers_of(run_chat(str(tmp_path / "adapter"), "--prompt", "What is 2+3?", "--json",
                                  "--temperature", "0", "--max-new-tokens", "12"))

    from rlt.models import load_eval_model

    merged = Chatbot(*load_eval_model(str(tmp_path / "adapter")), Settings(None, GREEDY, 12))
    plain = Chatbot(*tiny, Settings(None, GREEDY, 12))
    assert turn["assistant"] == merged.answer(Conversation(), "What is 2+3?", lambda _piece: None)[0]
    assert turn["assistant"] != plain.answer(Conversation(), "What is 2+3?", lambda _piece: None)[0]


@pytest.mark.parametrize("args", [["/nonexistent/model"], ["rlt:tiny", "--json"],
                                  ["rlt:tiny", "--top-k", "-1", "--max-new-tokens", "0"]])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, args):
    proc = run_chat(*args)
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: ")


def test_a_damaged_run_dir_is_one_error_line(run_dir, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    proc = run_chat(str(tmp_path / "run"))
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"error: run dir '{tmp_path / 'run'}' has no model yet: no final/ and no checkpoint-N (the run stopped before "
        "its first save)"]


def spawn_chat(*args: str) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, ["-m", "rlt.chat", *args], cwd=str(REPO), env=dict(os.environ),
                         encoding="utf-8", timeout=120, dimensions=(24, 200))


def test_a_terminal_session(tiny):
    expected = Chatbot(*tiny, Settings(None, GREEDY, 10)).answer(Conversation(), "hello", lambda _piece: None)[0]
    child = spawn_chat("rlt:tiny", "--temperature", "0", "--max-new-tokens", "10")
    child.expect_exact("/help lists the commands")
    child.expect_exact(">>> ")
    child.sendline("hello")
    child.expect_exact(">>> ")
    assert expected.replace("\n", "\r\n") + "\r\n" in child.before  # the answer, then the prompt again
    child.sendline("/help")
    child.expect_exact("/reset")
    child.expect_exact(">>> ")
    child.sendline("/system Be brief.")
    child.expect_exact("(system prompt set; new conversation)")
    child.sendline("/reset")
    child.expect_exact("(new conversation)")
    child.expect_exact(">>> ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_an_answer_and_ctrl_d_leaves():
    child = spawn_chat("rlt:tiny", "--temperature", "0", "--max-new-tokens", "1500")
    child.expect_exact(">>> ")
    child.sendline("hi")
    child.expect_exact("<answer")  # streaming: the first pieces show long before the 1500 tokens
    child.sendintr()
    child.expect_exact("(stopped)")
    child.expect_exact(">>> ")
    child.sendintr()  # at the prompt: a new prompt
    child.expect_exact("(Ctrl-D or /quit leaves)")
    child.expect_exact(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_doctests():
    import doctest

    import rlt.chat

    result = doctest.testmod(rlt.chat)
    assert result.attempted >= 10 and result.failed == 0
