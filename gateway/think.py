"""`<think>…</think>` split out of plain text, for engines that run without a reasoning parser.

DeepSeek-R1's chat template ends the prompt with `<think>\\n`, so the output starts inside the
reasoning: text before `</think>` is reasoning and text after it is content. A `<think>` that the
model writes itself at the very start is dropped. Without `</think>` all of it is reasoning, as
vLLM's deepseek_r1 parser has it (`reasoning/basic_parsers.py::extract_reasoning`).

A stream arrives in pieces that may cut a tag anywhere (`…</th` + `ink>…`), so the splitter holds
back a tail that could still become a tag and lets it go as soon as it cannot.
"""

OPEN = "<think>"
CLOSE = "</think>"


class ThinkSplitter:
    """Feed text piece by piece; get back what is known to be (reasoning, content) so far."""

    def __init__(self) -> None:
        self.state = "start"  # start → reasoning → content
        self._held = ""

    def feed(self, text: str) -> tuple[str, str]:
        text, self._held = self._held + text, ""
        if self.state == "start":
            stripped = text.lstrip()
            if len(stripped) < len(OPEN) and OPEN.startswith(stripped):  # blank, or `<thi`…
                self._held = text
                return "", ""
            if stripped.startswith(OPEN):
                text = stripped[len(OPEN) :]
            self.state = "reasoning"
        if self.state == "content":
            return "", text
        reasoning, tag, content = text.partition(CLOSE)
        if tag:
            self.state = "content"
            return reasoning, content
        keep = _partial_tag(text, CLOSE)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], ""

    def flush(self) -> tuple[str, str]:
        """The held-back tail, once the text has ended: it was no tag after all."""
        held, self._held = self._held, ""
        if self.state == "content":
            return "", held
        self.state = "reasoning"
        return held, ""


def split_think(text: str) -> tuple[str | None, str | None]:
    """A whole message's (reasoning, content); None for a part that is empty."""
    splitter = ThinkSplitter()
    reasoning, content = splitter.feed(text)
    rest_reasoning, rest_content = splitter.flush()
    return (reasoning + rest_reasoning) or None, (content + rest_content) or None


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is the beginning of `tag` (a cut-off tag)."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0
