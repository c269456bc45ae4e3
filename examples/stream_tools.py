"""Stream a Qwen3.6 answer with its reasoning shown apart, letting the model call Python functions as tools.

    python examples/stream_tools.py "What's the weather in Paris and Tokyo? Add up their temperatures."

Each round streams one assistant turn: reasoning (dimmed on a terminal, prefixed with "| " otherwise), then the
answer. When the turn ends in tool calls, they are run here, their results go back as `tool` messages, and the
model continues, until it answers without calling a tool or --max-rounds is reached. One prompt cache serves
every round, so each round only prefills what is new (see "cached" in the stats lines).

The model is $MLX_QWEN36_MODEL when set, else --model (a local folder or a Hugging Face repo id).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import mlx_qwen36
from mlx_qwen36.tool_parser import ToolCall

DEFAULT_MODEL = "mlx-community/Qwen3.6-35B-A3B-4bit"
DEFAULT_PROMPT = "What's the weather in Paris and in Tokyo right now? Then add up the two temperatures."

# --------------------------------------------------------------------------------------------------------
# The tools: plain Python functions, and the JSON schemas the model sees.
# --------------------------------------------------------------------------------------------------------

_WEATHER = {"paris": (18, "light rain"), "tokyo": (24, "sunny"), "new york": (21, "cloudy"), "london": (15, "fog")}


def get_weather(city: str, unit: str = "celsius") -> dict[str, Any]:
    """Current weather for a city (canned data: this is an example)."""
    temp_c, sky = _WEATHER.get(city.strip().lower(), (20, "clear"))
    temp = temp_c if unit == "celsius" else round(temp_c * 9 / 5 + 32, 1)
    return {"city": city, "temperature": temp, "unit": unit, "conditions": sky}


def add(a: float, b: float) -> float:
    """a + b."""
    return a + b


FUNCTIONS: dict[str, Callable[..., Any]] = {"get_weather": get_weather, "add": add}

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name, e.g. Paris"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit"},
        }, "required": ["city"]},
    }},
    {"type": "function", "function": {
        "name": "add",
        "description": "Add two numbers.",
        "parameters": {"type": "object", "properties": {
            "a": {"type": "number"}, "b": {"type": "number"},
        }, "required": ["a", "b"]},
    }},
]


def run_tool(call: ToolCall) -> str:
    """Run one tool call and return its result as the JSON text of the `tool` message.

    Failures (an unknown tool, wrong arguments, an exception) are reported to the model as {"error": ...}
    rather than raised: the model can then correct itself in the next round.
    """
    function = FUNCTIONS.get(call.name)
    if function is None:
        return json.dumps({"error": f"unknown tool '{call.name}'; available: {sorted(FUNCTIONS)}"})
    try:
        result = function(**call.arguments)
    except Exception as e:  # noqa: BLE001 - any failure goes back to the model as text
        return json.dumps({"error": f"{type(e).__name__}: {e}"})
    return json.dumps(result, ensure_ascii=False)


# --------------------------------------------------------------------------------------------------------
# Streaming one turn, and the tool loop.
# --------------------------------------------------------------------------------------------------------


class Printer:
    """Writes streamed text, setting reasoning apart: dimmed on a terminal, else each line prefixed with "| "."""

    DIM, RESET = "\033[2m", "\033[0m"

    def __init__(self, out=sys.stdout):
        self.out = out
        self.color = out.isatty() and not os.environ.get("NO_COLOR")
        self.phase: str | None = None
        self.at_line_start = True

    def write(self, phase: str, text: str) -> None:
        if not text:
            return
        if phase != self.phase:
            self.end_line()
            self.out.write({"reasoning": "[thinking]\n", "content": "[answer]\n"}.get(phase, ""))
            self.phase = phase
        if phase == "reasoning":
            if self.color:
                text = self.DIM + text + self.RESET
            else:
                text = "".join(("| " + line) if (i or self.at_line_start) else line
                               for i, line in enumerate(text.splitlines(keepends=True)))
        self.out.write(text)
        self.at_line_start = text.endswith("\n")
        self.out.flush()

    def line(self, text: str) -> None:
        self.end_line()
        self.out.write(text + "\n")
        self.out.flush()
        self.phase = None

    def end_line(self) -> None:
        if not self.at_line_start:
            self.out.write("\n")
            self.at_line_start = True


def stream_turn(model, processor, messages: list[dict], cache, printer: Printer, **kwargs: Any) -> dict[str, Any]:
    """Stream one assistant turn; returns its reasoning, content, tool calls and final chunk."""
    reasoning, content, calls = [], [], []
    last = None
    for chunk in mlx_qwen36.stream_generate(model, processor, messages, tools=TOOLS, prompt_cache=cache, **kwargs):
        if chunk.phase == "reasoning":
            reasoning.append(chunk.text)
        elif chunk.phase == "content":
            content.append(chunk.text)
        printer.write(chunk.phase, chunk.text)
        for call in chunk.tool_calls:
            calls.append(call)
            printer.line(f"-> {call.name}({call.arguments_json()})")
        last = chunk
    return {"reasoning": "".join(reasoning), "content": "".join(content), "tool_calls": calls, "final": last}


def chat_with_tools(model, processor, prompt: str, *, max_rounds: int = 5, printer: Printer | None = None,
                    **kwargs: Any) -> list[dict]:
    """Run the tool loop for one user prompt; returns the whole conversation (OpenAI-style messages)."""
    printer = printer or Printer()
    messages: list[dict] = [{"role": "user", "content": prompt}]
    cache = mlx_qwen36.make_prompt_cache(model)
    for round_no in range(1, max_rounds + 1):
        turn = stream_turn(model, processor, messages, cache, printer, **kwargs)
        final = turn["final"]
        printer.line(f"[round {round_no}] prompt: {final.prompt_tokens} tokens ({final.cached_tokens} cached) | "
                     f"generated: {final.generation_tokens} tokens at {final.generation_tps:.1f} tok/s | "
                     f"finish: {final.finish_reason}")
        calls: list[ToolCall] = turn["tool_calls"]
        messages.append({"role": "assistant", "content": turn["content"], "reasoning_content": turn["reasoning"],
                         **({"tool_calls": [c.to_openai() for c in calls]} if calls else {})})
        if not calls:
            break
        for call in calls:
            result = run_tool(call)
            printer.line(f"<- {call.name}: {result}")
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    else:
        printer.line(f"[stopped after {max_rounds} rounds of tool calls]")
    return messages


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="folder or Hub repo id ($MLX_QWEN36_MODEL wins)")
    parser.add_argument("--max-tokens", type=int, default=2048, help="per round")
    parser.add_argument("--max-rounds", type=int, default=5)
    parser.add_argument("--temperature", type=float, default=None, help="default: the model's generation_config")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-think", action="store_true", help="answer directly, without a reasoning phase")
    args = parser.parse_args(argv)

    model, processor = mlx_qwen36.load(os.environ.get("MLX_QWEN36_MODEL") or args.model)
    messages = chat_with_tools(model, processor, args.prompt, max_rounds=args.max_rounds,
                               max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                               enable_thinking=not args.no_think)
    rounds = sum(m["role"] == "assistant" for m in messages)
    tool_runs = sum(m["role"] == "tool" for m in messages)
    print(f"done: {rounds} round(s), {tool_runs} tool call(s)")


if __name__ == "__main__":
    main()
