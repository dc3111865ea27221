"""A model's own chat template (the GGUF's ``tokenizer.chat_template``), rendered the way
llama-cpp-python renders it: its Jinja2 formatter (sandboxed, with Transformers' extensions and
``raise_exception``), the model's BOS/EOS text, and tokens parsed with special tokens read as
such. An OpenAI-style list of messages becomes the token ids a prefill takes."""

from __future__ import annotations

from typing import Any

from edgelink.errors import ConfigError, StateError
from edgelink.runtime.llama import LlamaRuntime


class ChatTemplate:
    def __init__(self, rt: LlamaRuntime, template: str | None = None):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        text = template if template is not None else rt.meta("tokenizer.chat_template")
        if not text:
            raise ConfigError(f"{rt.path.name} has no chat template (tokenizer.chat_template): use "
                              "/v1/completions with a prompt, or a model that has one")
        self.rt = rt
        _, bos = rt.special_text("bos")
        self.eos_id, eos = rt.special_text("eos")
        self.template = text
        self._fmt = Jinja2ChatFormatter(template=text, eos_token=eos, bos_token=bos,
                                        stop_token_ids=[self.eos_id] if self.eos_id >= 0 else None)

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The prompt text for ``messages`` (with the generation prompt appended)."""
        try:
            return self._fmt(messages=messages).prompt
        except Exception as exc:  # noqa: BLE001 - a template raises what its author wrote
            raise StateError(f"the model's chat template refused these messages: {exc}") from None

    def tokens(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of the rendered prompt. The template writes BOS itself where it wants one
        (llama-cpp-python: ``add_bos = not added_special``, and its formatter says added)."""
        return self.rt.tokenize(self.render(messages), add_special=False, parse_special=True)
