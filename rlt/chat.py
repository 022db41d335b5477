"""Chat with a model in its chat template; given a run dir, its final/ or a checkpoint-N, with the run's system
prompt, sampling and completion length (`rlt.run_info.locate`).

    python -m rlt.chat results/tiny_grpo                      # the run's final/ model, as the run sampled
    python -m rlt.chat results/tiny_grpo/checkpoint-100 --temperature 0 --system "Answer briefly."
    python -m rlt.chat rlt:tiny --prompt "Hi" --prompt "And then?" --json     # for scripts: answers on stdout

Answers stream as they are generated (``model.generate`` in a thread, a `TextIteratorStreamer` read here); the
conversation is kept (its oldest turns dropped when the prompt would not fit the model's positions); ``/help`` lists
the commands. The user-facing description is in docs/tools.md (Chat).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from rlt.cli import parse_cli, shorten
from rlt.errors import ConfigError, RltError
from rlt.generation.sampling import GREEDY, Sampling

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 256  # without a run (or for an SFT run, which has no max_completion_length)
PROMPT = ">>> "
COMMANDS = (
    ("/help", "this list"),
    ("/reset", "forget the conversation (the system prompt stays)"),
    ("/system TEXT", "set the system prompt and start a new conversation; /system alone shows it, /system - removes "
                     "it"),
    ("/quit", "leave (Ctrl-D too); Ctrl-C stops an answer, ending it where it is"),
)
HELP = "\n".join(f"  {name:<13} {what}" for name, what in COMMANDS) + "\n  a message that starts with // is sent " \
    "with one / less"


# ------------------------------------------------------------------------------------------------- conversation


@dataclass
class Conversation:
    """A system prompt (None: none) and the turns so far, each ``(user, assistant)``.

    >>> c = Conversation("Be brief.")
    >>> c.add("Hi", "Hello.")
    >>> [m["role"] for m in c.messages("How are you?")]
    ['system', 'user', 'assistant', 'user']
    >>> c.set_system(None); c.messages("Hi")
    [{'role': 'user', 'content': 'Hi'}]
    """

    system: str | None = None
    turns: list[tuple[str, str]] = field(default_factory=list)

    def messages(self, user: str | None = None, *, skip: int = 0) -> list[dict[str, str]]:
        """The chat messages: the system prompt, the turns but the `skip` oldest, then `user` (when given)."""
        out = [{"role": "system", "content": self.system}] if self.system is not None else []
        for question, answer in self.turns[skip:]:
            out += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if user is not None:
            out.append({"role": "user", "content": user})
        return out

    def add(self, user: str, assistant: str) -> None:
        self.turns.append((user, assistant))

    def reset(self) -> None:
        """Forget the turns; the system prompt stays."""
        self.turns.clear()

    def set_system(self, text: str | None) -> None:
        """A new system prompt (None: none) and a new conversation."""
        self.system = text
        self.reset()


def fit(conversation: Conversation, user: str, count: Callable[[list[dict]], int],
        budget: int | None) -> tuple[list[dict], int]:
    """The messages for answering `user`, and how many of the oldest turns were left out so that their token count
    (`count`) is at most `budget` (None: no limit). The system prompt and `user` are always in. Raises `ConfigError`
    when even those do not fit.

    >>> c = Conversation("S", [("a" * 10, "b" * 10), ("c", "d")])
    >>> def chars(messages): return sum(len(m["content"]) for m in messages)
    >>> [m["content"] for m in fit(c, "q", chars, 4)[0]], fit(c, "q", chars, 4)[1]
    (['S', 'c', 'd', 'q'], 1)
    >>> fit(c, "q", chars, 100)[1]
    0
    """
    if budget is None:
        return conversation.messages(user), 0
    for skip in range(len(conversation.turns) + 1):
        messages = conversation.messages(user, skip=skip)
        if (size := count(messages)) <= budget:
            return messages, skip
    raise ConfigError(f"the message is too long: with the system prompt it takes {size} tokens and the model has "
                      f"room for {budget} besides the answer; shorten it or lower --max-new-tokens")


def parse_command(line: str) -> tuple[str, str] | None:
    """``(command, argument)`` for a ``/command`` line, None for a message (``//text`` is the message ``/text``).

    >>> parse_command("/system Be brief. "), parse_command("/reset"), parse_command("hello"), parse_command("//x")
    (('/system', 'Be brief.'), ('/reset', ''), None, None)
    """
    text = line.strip()
    if not text.startswith("/") or text.startswith("//"):
        return None
    name, _, arg = text.partition(" ")
    return name.lower(), arg.strip()


def message_text(line: str) -> str:
    """The message a non-command line sends.

    >>> message_text("  //etc/hosts? "), message_text("hi")
    ('/etc/hosts?', 'hi')
    """
    text = line.strip()
    return text[1:] if text.startswith("//") else text


# ----------------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """What the chat uses: the system prompt, the sampling, the answer length, the seed."""

    system: str | None
    sampling: Sampling
    max_new_tokens: int
    seed: int | None = None


def settings_for(located, args: argparse.Namespace) -> Settings:
    """The run's system prompt, sampling and completion length (`located`, an `rlt.run_info.Located`), each replaced
    by the flag that sets it. Without a run (or for an SFT run): no system prompt, greedy, 256 new tokens. ``--system
    ''`` removes the run's system prompt; ``--top-k 0`` and ``--min-p 0`` switch those filters off. Raises
    `ConfigError` for values that cannot be used."""
    from rlt.evaluate import resolve_system_prompt

    system = located.system_prompt if args.system is None else (resolve_system_prompt(args.system) or None)
    given = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p,
             "repetition_penalty": args.repetition_penalty}
    overrides = {k: None if k in ("top_k", "min_p") and v == 0 else v for k, v in given.items() if v is not None}
    sampling = replace(located.sampling or GREEDY, **overrides)
    max_new_tokens = (args.max_new_tokens if args.max_new_tokens is not None
                      else located.max_new_tokens or DEFAULT_MAX_NEW_TOKENS)
    problems = sampling.problems()
    if max_new_tokens < 1:
        problems.append(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if problems:
        raise ConfigError("; ".join(problems))
    return Settings(system=system, sampling=sampling, max_new_tokens=max_new_tokens, seed=args.seed)


def header(located, settings: Settings, *, interactive: bool) -> str:
    """The startup line: model dir, run, system prompt (shortened), sampling and answer length.

    >>> from rlt.run_info import Located
    >>> header(Located("rlt:tiny", "rlt:tiny"), Settings(None, GREEDY, 256), interactive=False)
    'rlt.chat: rlt:tiny | no run | system prompt: none | greedy | max_new_tokens 256'
    """
    run = f"run {located.get('run_name') or located.run_dir.name} ({located.run_dir})" if located.has_run else "no run"
    system = "none" if settings.system is None else repr(shorten(settings.system, 60))
    parts = [f"rlt.chat: {located.model_dir}", run, f"system prompt: {system}", settings.sampling.describe(),
             f"max_new_tokens {settings.max_new_tokens}"]
    if settings.seed is not None:
        parts.append(f"seed {settings.seed}")
    if interactive:
        parts.append("/help lists the commands")
    return " | ".join(parts)


# ------------------------------------------------------------------------------------------------------ the model


class _StopFlag:
    """A stopping criterion that ends generation once `event` is set (Ctrl-C)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _piece_streamer(tokenizer):
    """A `TextIteratorStreamer` (of the answer, without special tokens) that passes on each token's text as it comes.
    transformers' own waits for a space or a newline, in case a word changes with its next token: the byte-level BPE
    tokenizers of today's chat models never change it, and a run of tokens without a space (code, a random model)
    would not stream at all. Held back: a character whose bytes are not all there yet (decoded as U+FFFD)."""
    from transformers import TextIteratorStreamer

    class PieceStreamer(TextIteratorStreamer):
        def put(self, value):
            if value.dim() > 1:
                value = value[0]
            if self.skip_prompt and self.next_tokens_are_prompt:
                self.next_tokens_are_prompt = False
                return
            self.token_cache.extend(value.tolist())
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            if text.endswith("\ufffd"):
                return
            piece = text[self.print_len:]
            if text.endswith("\n"):  # decode from here on: each token does not decode the whole answer again
                self.token_cache, self.print_len = [], 0
            else:
                self.print_len = len(text)
            if piece:
                self.on_finalized_text(piece)

    return PieceStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


class Chatbot:
    """A loaded model and tokenizer answering a `Conversation` with `Settings`."""

    def __init__(self, model, tokenizer, settings: Settings):
        if not tokenizer.chat_template:
            raise ConfigError("the model's tokenizer has no chat template (a base model, not a chat model): rlt.chat "
                              "renders conversations with it")
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.max_positions: int | None = getattr(config, "max_position_embeddings", None)
        if self.max_positions is not None and settings.max_new_tokens >= self.max_positions:
            raise ConfigError(f"max_new_tokens ({settings.max_new_tokens}) leaves no room for a prompt: the model "
                              f"takes at most {self.max_positions} positions")

    @classmethod
    def load(cls, model_dir: str, settings: Settings, *, torch_dtype: str = "auto") -> Chatbot:
        import torch

        from rlt.models import load_eval_model

        model, tokenizer = load_eval_model(model_dir, torch_dtype=torch_dtype)
        if torch.cuda.is_available():
            model.to("cuda")
        return cls(model, tokenizer, settings)

    def render(self, messages: list[dict]) -> str:
        """`messages` as the chat template renders them, with the assistant's generation prompt."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def count(self, messages: list[dict]) -> int:
        return len(self.tokenizer(self.render(messages), add_special_tokens=False)["input_ids"])

    def prompt_for(self, conversation: Conversation, user: str) -> str:
        """The rendered prompt that answers `user`; the oldest turns that would not fit are dropped from
        `conversation` (with a note on stderr). Raises `ConfigError` when `user` alone does not fit."""
        budget = None if self.max_positions is None else self.max_positions - self.settings.max_new_tokens
        messages, dropped = fit(conversation, user, self.count, budget)
        if dropped:
            del conversation.turns[:dropped]
            logger.warning("left out the %d oldest turn%s: the conversation and a %d-token answer must fit the "
                           "model's %d positions", dropped, "s" * (dropped > 1), self.settings.max_new_tokens,
                           self.max_positions)
        return self.render(messages)

    def generation_config(self):
        from transformers import GenerationConfig

        from rlt.generation.sampling import eos_ids

        eos = eos_ids(self.model, self.tokenizer)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (eos[0] if eos else None)
        return GenerationConfig(max_new_tokens=self.settings.max_new_tokens, pad_token_id=pad,
                                eos_token_id=eos[0] if len(eos) == 1 else (eos or None),
                                **self.settings.sampling.hf_kwargs())

    def stream(self, prompt: str, write: Callable[[str], None]) -> tuple[str, bool]:
        """Generate the answer to the rendered `prompt`, passing each new piece of text to `write` as it comes.
        Returns ``(answer, interrupted)``: Ctrl-C (KeyboardInterrupt here) stops the generation after its current
        token, and the answer is what was generated until then."""
        from transformers import StoppingCriteriaList

        enc = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(self.model.device)
        streamer = _piece_streamer(self.tokenizer)
        stop, done, failed = threading.Event(), [], []

        def generate():
            try:
                done.append(self.model.generate(**enc, generation_config=self.generation_config(), streamer=streamer,
                                                stopping_criteria=StoppingCriteriaList([_StopFlag(stop)])))
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                failed.append(e)
                streamer.text_queue.put(streamer.stop_signal)

        thread = threading.Thread(target=generate, name="rlt-chat-generate", daemon=True)
        thread.start()
        pieces: list[str] = []
        while True:
            try:
                for piece in streamer:
                    pieces.append(piece)
                    write(piece)
                break
            except KeyboardInterrupt:
                stop.set()  # the stream goes on to its end: generate() stops after the current token
        thread.join()
        if failed:
            raise failed[0]
        answer = done[0][0, enc["input_ids"].shape[1]:]
        return self.tokenizer.decode(answer, skip_special_tokens=True), stop.is_set()

    def answer(self, conversation: Conversation, user: str, write: Callable[[str], None]) -> tuple[str, bool]:
        """Answer `user` in `conversation` (streamed to `write`) and add the turn; ``(answer, interrupted)``."""
        answer, interrupted = self.stream(self.prompt_for(conversation, user), write)
        conversation.add(user, answer)
        return answer, interrupted


# ---------------------------------------------------------------------------------------------------- front ends


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_command(name: str, arg: str, conversation: Conversation) -> bool:
    """Carry out a ``/command``; False for ``/quit``."""
    if name in ("/quit", "/exit"):
        return False
    if name == "/help":
        _note(HELP)
    elif name == "/reset":
        conversation.reset()
        _note("(new conversation)")
    elif name == "/system" and not arg:
        _note(f"system prompt: {conversation.system!r}" if conversation.system is not None else "no system prompt")
    elif name == "/system":
        conversation.set_system(None if arg == "-" else arg)
        _note("(system prompt removed; new conversation)" if arg == "-" else "(system prompt set; new conversation)")
    else:
        _note(f"unknown command {name}: /help lists the commands")
    return True


def interactive(bot: Chatbot, conversation: Conversation, read: Callable[[str], str] = input) -> None:
    """Read messages and commands until /quit or end of input; each answer streams to stdout. The ``>>>`` prompt
    shows only when stdin is a terminal."""
    prompt = PROMPT if sys.stdin.isatty() else ""
    while True:
        try:
            line = read(prompt)
        except EOFError:
            if prompt:
                _stdout("\n")
            return
        except KeyboardInterrupt:
            _stdout("\n")
            _note("(Ctrl-D or /quit leaves)")
            continue
        command = parse_command(line)
        if command is not None:
            if not run_command(*command, conversation):
                return
            continue
        if not (text := message_text(line)):
            continue
        try:
            _answer, interrupted = bot.answer(conversation, text, _stdout)
        except ConfigError as e:  # the message does not fit: say so and keep the conversation
            _note(f"error: {' '.join(str(e).split())}")
            continue
        except KeyboardInterrupt:  # between the answer's end and here: nothing to stop
            interrupted = False
        _stdout("\n")
        if interrupted:
            _note("(stopped)")


def answer_prompts(bot: Chatbot, conversation: Conversation, prompts: Sequence[str], *, as_json: bool) -> None:
    """Each prompt as the next user turn; the answers on stdout, one after the other (streamed, each ending with a
    newline), or with `as_json` once at the end as ``[{"user": ..., "assistant": ...}, ...]``."""
    write = (lambda _text: None) if as_json else _stdout
    for prompt in prompts:
        _answer, interrupted = bot.answer(conversation, prompt, write)
        if interrupted:
            raise KeyboardInterrupt
        write("\n")
    if as_json:
        _stdout(json.dumps([{"user": u, "assistant": a} for u, a in conversation.turns], ensure_ascii=False,
                           indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rlt.chat", description=__doc__.split("\n\n")[0],
                                     epilog="In the chat:\n" + HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL_OR_RUN_DIR",
                        help="a run dir (its final/ model), a run's final/ or checkpoint-N, a model dir, a LoRA "
                             "adapter dir, a hub id or an rlt: name")
    parser.add_argument("--system", default=None,
                        help="system prompt (default: the run's; '' = none; @reasoning = the <reasoning>/<answer> "
                             "format prompt, @student = the RLT student prompt)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature, 0 = greedy (default: the run's, else 0)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus filter, 1 = off (default: the run's)")
    parser.add_argument("--top-k", type=int, default=None, help="top-k filter, 0 = off (default: the run's)")
    parser.add_argument("--min-p", type=float, default=None, help="min-p filter, 0 = off (default: the run's)")
    parser.add_argument("--repetition-penalty", type=float, default=None, help="1 = off (default: the run's)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"answer length limit (default: the run's max_completion_length, else "
                             f"{DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--seed", type=int, default=None, help="seed the sampling (default: a different chat each "
                                                                "time)")
    parser.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                        help="answer TEXT and exit, no chat (repeatable: the next user turn of one conversation); "
                             "only the answers go to stdout")
    parser.add_argument("--json", action="store_true",
                        help='with --prompt: print [{"user": ..., "assistant": ...}, ...] instead of the answers')
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    parser.add_argument("--verbose", action="store_true", help="show the loading logs and third-party warnings")
    return parser


def _quiet(verbose: bool) -> None:
    """rlt's INFO logs (loading) and third-party noise (`rlt.console.configure_noise`) only with --verbose."""
    from rlt.console import configure_noise

    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    configure_noise(verbose)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input with a one-line error on stderr, 130 Ctrl-C)."""
    from rlt.run_info import locate

    args = parse_cli(build_parser(), argv)
    try:
        if args.json and not args.prompt:
            raise ConfigError("--json needs --prompt (it prints the answers to the prompts as JSON)")
        located = locate(args.model)
        settings = settings_for(located, args)
        _quiet(args.verbose)
        _note(header(located, settings, interactive=not args.prompt))
        bot = Chatbot.load(located.model_dir, settings, torch_dtype=args.dtype)
        if settings.seed is not None:
            import torch

            torch.manual_seed(settings.seed)
        conversation = Conversation(settings.system)
        if args.prompt:
            answer_prompts(bot, conversation, args.prompt, as_json=args.json)
        else:
            if sys.stdin.isatty():
                import readline  # noqa: F401 - line editing and history for input()
            interactive(bot, conversation)
    except RltError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _note("")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
