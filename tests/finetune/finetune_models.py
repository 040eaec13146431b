"""What the fine-tuning tests share: a tiny GLM-4-9B-chat checkpoint (the real GLM-4 tokenizer and chat
format, random 2-layer weights: tests/test_glm_chat.py's builder) and small training files for it."""

from __future__ import annotations

import json
from pathlib import Path

from test_glm_chat import glm4_9b_chat

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def glm4_checkpoint(folder: Path) -> Path:
    glm4_9b_chat(folder)
    return folder


def facts(count: int) -> list[dict]:
    """Short conversations with a fixed answer per question: something a LoRA learns in a few steps."""
    cities = ["北京", "上海", "Paris", "London", "东京", "Berlin"]
    return [{"messages": [{"role": "user", "content": f"代号 {i % 6}?"},
                          {"role": "assistant", "content": f"{cities[i % 6]} {i % 6}"}]} for i in range(count)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path
