"""Generated ids -> the text a client may see: whole UTF-8 characters, cut before any stop string.

A stop string can span several tokens ("is 1" may arrive as "is", " 1"), so text is released only once it can no
longer be the start of a stop string: the longest tail that is a prefix of one is held back (vLLM and TGI do the
same). Used by the server (streaming and not) and `scratchllm generate`/`chat`.
"""

from __future__ import annotations

from dataclasses import dataclass

from scratchllm.infer.continuous import TokenLogprob
from scratchllm.tokenizer.bpe import StreamDecoder, Tokenizer


class StopMatcher:
    """Worked example, stop="is 1": push("The answer ") -> ("The answer ", False); push("is") -> ("", False) holds
    "is"; push(" 2") -> ("is 2", False); push(" is") -> (" ", False); push(" 1.") -> ("", True): "is 1." was cut."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """New text -> (text now safe to show, whether a stop string matched; then nothing after it is shown)."""
        self.held += piece
        # The stop that completes first wins (then the longer one): the same cut whatever the pieces were.
        found = [(self.held.find(s) + len(s), self.held.find(s)) for s in self.stops if s in self.held]
        if found:
            safe, self.held = self.held[: min(found)[1]], ""
            return safe, True
        keep = max((n for s in self.stops for n in range(1, len(s)) if self.held.endswith(s[:n])), default=0)
        safe, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return safe, False

    def flush(self) -> str:
        """The generation ended without a match: what was held back is plain text after all."""
        text, self.held = self.held, ""
        return text


@dataclass
class TokenEntry:
    """One generated token for the `logprobs` fields; `start` is its first character's offset in the reply."""

    token: int
    start: int
    logprob: TokenLogprob | None


class ReplyText:
    """Tokens in, (released text, the token entries it completes) out, holding back possible stop strings."""

    def __init__(self, tok: Tokenizer, stops: list[str]) -> None:
        self.decoder = StreamDecoder(tok)
        self.matcher = StopMatcher(stops)
        self.decoded = 0  # characters decoded so far
        self.released = 0  # characters shown so far
        self.entries: list[TokenEntry] = []  # decoded but not yet released

    def push(self, token: int, logprob: TokenLogprob | None) -> tuple[str, list[TokenEntry], bool]:
        self.entries.append(TokenEntry(token, self.decoded, logprob))
        piece = self.decoder.push(token)
        self.decoded += len(piece)
        text, stopped = self.matcher.push(piece)
        return text, self._release(text, everything=False), stopped

    def flush(self) -> tuple[str, list[TokenEntry]]:
        text = self.matcher.flush() + self.decoder.flush()
        return text, self._release(text, everything=True)

    def _release(self, text: str, everything: bool) -> list[TokenEntry]:
        """The entries of tokens whose text starts in what is now shown (a token cut by a stop string counts)."""
        self.released += len(text)
        cut = len(self.entries) if everything else next(
            (i for i, e in enumerate(self.entries) if e.start >= self.released), len(self.entries))
        done, self.entries = self.entries[:cut], self.entries[cut:]
        return done
