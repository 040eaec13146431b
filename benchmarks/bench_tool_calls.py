"""Tool-call accuracy: glmstack serve against llama.cpp's llama-server on the same GGUF, the same cases, the
same client, in one run (issue 16).

    LLAMA_SERVER="$(bash benchmarks/build_llama_server.sh)"
    python benchmarks/bench_tool_calls.py --llama-server "$LLAMA_SERVER" --llama-required [--out results.json]
        [--servers llama llama-hermes glmstack] [--threads 2] [--concurrency 1] [--single-call] [--limit N]

The cases are tests/data/tool_calls_en.jsonl (64 single-call English requests; `--write-data` regenerates the
file from CASES below): each offers 2-4 OpenAI function tools from a pool of 15 and asks, in one user message,
for exactly one call whose argument values are written in the message. Every case goes through the openai SDK
(`chat.completions.create`, temperature 0, max_tokens 256, `tools`, `tool_choice`), --concurrency requests at
a time (default: one after another), to:

- `llama`: `llama-server --jinja -m GGUF -c 4096 -t THREADS` with the GGUF's own chat template. SmolLM2's
  template knows no tools, and llama.cpp (this version's differential template analysis; the old "generic"
  fallback format is gone) then finds no tool-call syntax: the tools are left out of the prompt, no grammar is
  used, and the reply is plain text whatever `tool_choice` says;
- `llama-hermes`: the same plus `--chat-template-file` with HERMES_TEMPLATE (SmolLM2's ChatML with Qwen2.5's
  tools block and `<tool_call>` syntax: the prompt glmstack's Hermes format renders for this model), so that
  llama.cpp sees the tools and constrains with its own grammar: for "auto" lazily, once `<tool_call>` is
  written; for "required" from the first token, but its grammar still allows any text before `<tool_call>`;
- `glmstack`: `glmstack serve --model GGUF` (loopback, no keys, a throwaway GLMSTACK_HOME), "auto" and
  "required".

llama-server runs "auto" only unless --llama-required. `parallel_tool_calls` is not sent (both servers then
allow several calls) unless --single-call sends false. Printed per server x tool_choice:

- function: share of cases answered with exactly one tool call, to the expected function;
- full: function right and its arguments equal to the expected ones (see `arguments_match`: strings compared
  stripped and case-insensitively, numbers as floats, an unlisted optional argument absent or its default);
- valid JSON: share of cases with at least one tool call whose every `arguments` string parses as a JSON object;
- latency: mean seconds per request (client side, failures included);
- failures by kind (http-500, timeout, no-call, 2-calls, bad-json, wrong-name, wrong-args, ...).

A request that fails (HTTP error, timeout) counts as wrong. --out writes every case's reply and verdict as JSON
(rewritten after each pass, so an interrupted run keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
from bench_servers import free_port, wait_ready

from glmstack.engine.loading.catalog import bundled_model_path

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "tool_calls_en.jsonl"
MAX_TOKENS = 256

# ---- the data set -------------------------------------------------------------------------------------------


def _function(name: str, description: str, properties: dict[str, dict], required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


_S = {"type": "string"}
TOOLS: dict[str, dict] = {t["function"]["name"]: t for t in [
    _function("get_weather", "Get the current weather in a city.", {
        "city": {**_S, "description": "City name, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius",
                 "description": "Temperature unit"}}, ["city"]),
    _function("get_flight_number", "Find the flight number of a flight between two cities on a date.", {
        "departure": {**_S, "description": "City the flight leaves from"},
        "destination": {**_S, "description": "City the flight goes to"},
        "date": {**_S, "description": "Date as YYYY-MM-DD"}}, ["departure", "destination", "date"]),
    _function("get_ticket_price", "Get the ticket price of a flight on a date.", {
        "flight_number": {**_S, "description": "Flight number, e.g. BA117"},
        "date": {**_S, "description": "Date as YYYY-MM-DD"}}, ["flight_number", "date"]),
    _function("send_email", "Send an email.", {
        "to": {**_S, "description": "Recipient email address"},
        "subject": {**_S, "description": "Subject line"},
        "body": {**_S, "description": "Message text"}}, ["to", "subject", "body"]),
    _function("convert_currency", "Convert an amount of money from one currency to another.", {
        "amount": {"type": "number", "description": "Amount to convert"},
        "from": {**_S, "description": "Currency code to convert from, e.g. USD"},
        "to": {**_S, "description": "Currency code to convert to, e.g. EUR"}}, ["amount", "from", "to"]),
    _function("search_web", "Search the web.", {
        "query": {**_S, "description": "Search query"},
        "max_results": {"type": "integer", "default": 5, "description": "How many results to return"}},
        ["query"]),
    _function("set_timer", "Start a countdown timer.", {
        "minutes": {"type": "integer", "description": "Length of the timer in minutes"},
        "label": {**_S, "description": "Optional name for the timer"}}, ["minutes"]),
    _function("create_event", "Create a calendar event.", {
        "title": {**_S, "description": "Event title"},
        "date": {**_S, "description": "Date as YYYY-MM-DD"},
        "time": {**_S, "description": "Start time as HH:MM (optional)"}}, ["title", "date"]),
    _function("get_stock_price", "Get the current price of a stock.", {
        "symbol": {**_S, "description": "Ticker symbol, e.g. AAPL"}}, ["symbol"]),
    _function("translate", "Translate text into another language.", {
        "text": {**_S, "description": "Text to translate"},
        "target_language": {"type": "string", "enum": ["english", "french", "german", "spanish", "italian",
                                                       "japanese"], "description": "Language to translate into"}},
        ["text", "target_language"]),
    _function("book_restaurant", "Book a table at a restaurant.", {
        "name": {**_S, "description": "Restaurant name"},
        "people": {"type": "integer", "description": "Number of people"},
        "time": {**_S, "description": "Time as HH:MM"}}, ["name", "people", "time"]),
    _function("calculate", "Evaluate a mathematical expression.", {
        "expression": {**_S, "description": "The expression, e.g. 2*(3+4)"}}, ["expression"]),
    _function("get_news", "Get the latest news headlines on a topic.", {
        "topic": {**_S, "description": "News topic"},
        "count": {"type": "integer", "default": 3, "description": "How many headlines"}}, ["topic"]),
    _function("play_music", "Play music by an artist, optionally a specific song.", {
        "artist": {**_S, "description": "Artist name"},
        "song": {**_S, "description": "Song title (optional)"}}, ["artist"]),
    _function("turn_on_lights", "Turn on the lights in a room.", {
        "room": {**_S, "description": "Room name"},
        "brightness": {"type": "integer", "default": 100, "description": "Brightness in percent"}}, ["room"]),
]}

# Tools easily mistaken for each other: offered together when one of them is expected.
SIBLINGS = {"get_flight_number": "get_ticket_price", "get_ticket_price": "get_flight_number",
            "set_timer": "create_event", "create_event": "set_timer", "get_stock_price": "convert_currency",
            "search_web": "get_news", "get_news": "search_web", "play_music": "turn_on_lights"}

# (user message, function, arguments): every value is written in the message.
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("What's the weather like in Paris right now?", "get_weather", {"city": "Paris"}),
    ("Tell me the current weather in Tokyo in fahrenheit.", "get_weather", {"city": "Tokyo", "unit": "fahrenheit"}),
    ("How warm is it in Berlin today? Give me the temperature in celsius.", "get_weather",
     {"city": "Berlin", "unit": "celsius"}),
    ("Is it raining in Seattle at the moment?", "get_weather", {"city": "Seattle"}),
    ("Check the weather in Buenos Aires for me, in fahrenheit please.", "get_weather",
     {"city": "Buenos Aires", "unit": "fahrenheit"}),
    ("Find the flight number from London to New York on 2025-03-14.", "get_flight_number",
     {"departure": "London", "destination": "New York", "date": "2025-03-14"}),
    ("Which flight goes from Madrid to Rome on 2025-07-02? I need its flight number.", "get_flight_number",
     {"departure": "Madrid", "destination": "Rome", "date": "2025-07-02"}),
    ("I need the flight number for a trip from Chicago to Denver on 2025-11-20.", "get_flight_number",
     {"departure": "Chicago", "destination": "Denver", "date": "2025-11-20"}),
    ("Look up the flight number from Sydney to Singapore on 2025-01-08.", "get_flight_number",
     {"departure": "Sydney", "destination": "Singapore", "date": "2025-01-08"}),
    ("How much is a ticket for flight BA117 on 2025-03-14?", "get_ticket_price",
     {"flight_number": "BA117", "date": "2025-03-14"}),
    ("What does a ticket on flight LH404 cost on 2025-06-30?", "get_ticket_price",
     {"flight_number": "LH404", "date": "2025-06-30"}),
    ("Get me the ticket price of flight AF1280 on 2025-09-05.", "get_ticket_price",
     {"flight_number": "AF1280", "date": "2025-09-05"}),
    ("Price check: flight UA89 on 2025-12-24.", "get_ticket_price", {"flight_number": "UA89", "date": "2025-12-24"}),
    ('Send an email to anna@example.com with the subject "Lunch" and the body "See you at noon."', "send_email",
     {"to": "anna@example.com", "subject": "Lunch", "body": "See you at noon."}),
    ('Email bob@work.org, subject "Report", body "The report is attached."', "send_email",
     {"to": "bob@work.org", "subject": "Report", "body": "The report is attached."}),
    ('Please send an email to team@startup.io with subject "Meeting moved" and body "The meeting is now at 3 pm."',
     "send_email", {"to": "team@startup.io", "subject": "Meeting moved", "body": "The meeting is now at 3 pm."}),
    ('Write an email to mom@family.net. Subject: "Dinner". Body: "I will be home by seven."', "send_email",
     {"to": "mom@family.net", "subject": "Dinner", "body": "I will be home by seven."}),
    ("Convert 100 USD to EUR.", "convert_currency", {"amount": 100, "from": "USD", "to": "EUR"}),
    ("How much is 250.5 GBP in JPY?", "convert_currency", {"amount": 250.5, "from": "GBP", "to": "JPY"}),
    ("Change 75 EUR into CHF.", "convert_currency", {"amount": 75, "from": "EUR", "to": "CHF"}),
    ("What is 1200 JPY in USD?", "convert_currency", {"amount": 1200, "from": "JPY", "to": "USD"}),
    ("Convert 19.99 CAD to AUD.", "convert_currency", {"amount": 19.99, "from": "CAD", "to": "AUD"}),
    ('Search the web for "best hiking trails in Colorado".', "search_web",
     {"query": "best hiking trails in Colorado"}),
    ('Search the web for "python asyncio tutorial" and give me 3 results.', "search_web",
     {"query": "python asyncio tutorial", "max_results": 3}),
    ('Look up "history of the printing press" online, 10 results please.', "search_web",
     {"query": "history of the printing press", "max_results": 10}),
    ('Do a web search for "cheap flights to Lisbon".', "search_web", {"query": "cheap flights to Lisbon"}),
    ("Set a timer for 10 minutes.", "set_timer", {"minutes": 10}),
    ('Set a 25 minute timer labeled "pomodoro".', "set_timer", {"minutes": 25, "label": "pomodoro"}),
    ('Start a timer for 45 minutes called "bread".', "set_timer", {"minutes": 45, "label": "bread"}),
    ("Please set a timer for 3 minutes.", "set_timer", {"minutes": 3}),
    ('Create an event called "Team sync" on 2025-04-10 at 09:30.', "create_event",
     {"title": "Team sync", "date": "2025-04-10", "time": "09:30"}),
    ('Add "Dentist appointment" to my calendar on 2025-05-22.', "create_event",
     {"title": "Dentist appointment", "date": "2025-05-22"}),
    ('Schedule an event titled "Birthday party" on 2025-08-16 at 18:00.', "create_event",
     {"title": "Birthday party", "date": "2025-08-16", "time": "18:00"}),
    ('Create a calendar event "Project deadline" on 2025-10-01.', "create_event",
     {"title": "Project deadline", "date": "2025-10-01"}),
    ("What's the stock price of AAPL?", "get_stock_price", {"symbol": "AAPL"}),
    ("Get the current share price for MSFT.", "get_stock_price", {"symbol": "MSFT"}),
    ("How is TSLA stock trading right now?", "get_stock_price", {"symbol": "TSLA"}),
    ("Look up the stock price of NVDA.", "get_stock_price", {"symbol": "NVDA"}),
    ('Translate "Good morning" into French.', "translate", {"text": "Good morning", "target_language": "french"}),
    ('How do you say "Where is the train station?" in German?', "translate",
     {"text": "Where is the train station?", "target_language": "german"}),
    ('Translate "thank you very much" to Japanese.', "translate",
     {"text": "thank you very much", "target_language": "japanese"}),
    ('Please translate "I love reading books" into Spanish.', "translate",
     {"text": "I love reading books", "target_language": "spanish"}),
    ('Translate "The weather is nice today" into Italian.', "translate",
     {"text": "The weather is nice today", "target_language": "italian"}),
    ("Book a table at Luigi's for 4 people at 19:30.", "book_restaurant",
     {"name": "Luigi's", "people": 4, "time": "19:30"}),
    ("Reserve a table for 2 people at Sakura Sushi at 20:00.", "book_restaurant",
     {"name": "Sakura Sushi", "people": 2, "time": "20:00"}),
    ("Make a booking at The Green Fork for 6 people at 12:15.", "book_restaurant",
     {"name": "The Green Fork", "people": 6, "time": "12:15"}),
    ("Can you book Chez Marie for 3 people at 18:45?", "book_restaurant",
     {"name": "Chez Marie", "people": 3, "time": "18:45"}),
    ('Calculate the expression "15*4+2".', "calculate", {"expression": "15*4+2"}),
    ('Compute "sqrt(144) + 8" with the calculator.', "calculate", {"expression": "sqrt(144) + 8"}),
    ('Evaluate "365*24" for me.', "calculate", {"expression": "365*24"}),
    ('Use the calculator to work out "(3.5+1.5)/2".', "calculate", {"expression": "(3.5+1.5)/2"}),
    ("Get me the latest news about climate change.", "get_news", {"topic": "climate change"}),
    ("Show me 5 news headlines about electric cars.", "get_news", {"topic": "electric cars", "count": 5}),
    ('Give me 2 news headlines on the topic "stock market".', "get_news", {"topic": "stock market", "count": 2}),
    ("Find the latest Olympics news.", "get_news", {"topic": "Olympics"}),
    ("Play some music by Adele.", "play_music", {"artist": "Adele"}),
    ('Play "Bohemian Rhapsody" by Queen.', "play_music", {"artist": "Queen", "song": "Bohemian Rhapsody"}),
    ('Put on "Shape of You" by Ed Sheeran.', "play_music", {"artist": "Ed Sheeran", "song": "Shape of You"}),
    ("I want to listen to Miles Davis.", "play_music", {"artist": "Miles Davis"}),
    ("Turn on the lights in the kitchen.", "turn_on_lights", {"room": "kitchen"}),
    ("Switch on the living room lights at 40 percent brightness.", "turn_on_lights",
     {"room": "living room", "brightness": 40}),
    ("Turn the bedroom lights on, brightness 75.", "turn_on_lights", {"room": "bedroom", "brightness": 75}),
    ("Lights on in the garage please.", "turn_on_lights", {"room": "garage"}),
    ("Turn on the lights in the office at brightness 20.", "turn_on_lights", {"room": "office", "brightness": 20}),
]


def build_cases() -> list[dict]:
    """The data set: each case offers its function, its sibling (if any) and random others, 2-4 in all, in a
    shuffled order; seeded by the case's position, so the file is the same on every run."""
    cases = []
    for i, (message, name, arguments) in enumerate(CASES):
        rng = random.Random(i)
        offered = [name] + ([SIBLINGS[name]] if name in SIBLINGS else [])
        others = [n for n in TOOLS if n not in offered]
        offered += rng.sample(others, max(0, rng.randint(2, 4) - len(offered)))
        rng.shuffle(offered)
        cases.append({"id": f"{name}-{i:02d}", "tools": [TOOLS[n] for n in offered],
                      "messages": [{"role": "user", "content": message}],
                      "expected": {"name": name, "arguments": arguments}})
    return cases


def check_case(case: dict) -> None:
    """Each expected value must be written in the message (strings verbatim up to case, numbers as written)."""
    message = case["messages"][0]["content"].lower()
    for key, value in case["expected"]["arguments"].items():
        written = value.lower() if isinstance(value, str) else f"{value:g}"
        assert written in message, (case["id"], key, value)


# ---- scoring ------------------------------------------------------------------------------------------------


def _normal(value: Any) -> Any:
    """Strings: stripped, inner whitespace runs as one space, case-folded. Numbers (not bools): floats."""
    if isinstance(value, str):
        return " ".join(value.split()).casefold()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def arguments_match(got: dict, expected: dict, schema: dict) -> bool:
    """Every expected argument present with an equal normalised value (a number must be a JSON number, "4" is not
    4); any other argument must be one the schema declares optional, with a value equal to its schema default
    (an optional argument without a default must be left out)."""
    properties = schema.get("properties", {})
    for key, value in got.items():
        if key in expected:
            if _normal(value) != _normal(expected[key]):
                return False
        elif key not in properties or "default" not in properties[key]:
            return False
        elif _normal(value) != _normal(properties[key]["default"]):
            return False
    return all(key in got for key in expected)


def score(case: dict, reply: Any) -> dict[str, Any]:
    """Verdict on one reply (a ChatCompletion, or the exception the request raised)."""
    if isinstance(reply, Exception):
        return {"function": False, "full": False, "valid_json": False, "error": error_kind(reply)}
    message = reply.choices[0].message
    calls = message.tool_calls or []
    parsed = []
    for call in calls:
        try:
            arguments = json.loads(call.function.arguments)
        except (TypeError, ValueError):
            arguments = None
        parsed.append((call.function.name, arguments if isinstance(arguments, dict) else None))
    valid_json = bool(parsed) and all(arguments is not None for _, arguments in parsed)
    expected = case["expected"]
    verdict = {"function": False, "full": False, "valid_json": valid_json, "error": None}
    if not calls:
        verdict["error"] = "no-call"
    elif len(calls) > 1:
        verdict["error"] = f"{len(calls)}-calls"
    elif parsed[0][0] != expected["name"]:
        verdict["error"] = "wrong-name"
    else:
        verdict["function"] = True
        schema = next(t["function"]["parameters"] for t in case["tools"] if t["function"]["name"] == expected["name"])
        if parsed[0][1] is None:
            verdict["error"] = "bad-json"
        elif arguments_match(parsed[0][1], expected["arguments"], schema):
            verdict["full"] = True
        else:
            verdict["error"] = "wrong-args"
    return verdict


def error_kind(error: Exception) -> str:
    if isinstance(error, openai.APIStatusError):
        return f"http-{error.status_code}"
    if isinstance(error, openai.APITimeoutError):
        return "timeout"
    if isinstance(error, openai.APIConnectionError):
        return "connection"
    return type(error).__name__


def reply_record(reply: Any) -> Any:
    if isinstance(reply, Exception):
        return {"error": f"{type(reply).__name__}: {reply}"[:500]}
    message = reply.choices[0].message
    return {"content": message.content, "finish_reason": reply.choices[0].finish_reason,
            "tool_calls": [{"name": c.function.name, "arguments": c.function.arguments}
                           for c in message.tool_calls or []]}


# ---- runs ---------------------------------------------------------------------------------------------------

# SmolLM2's ChatML template (same default system prompt) with Qwen2.5's tools block and tool-call syntax: with
# tools, the system message is the client's system text (if any), a blank line and the block -- as glmstack's
# Hermes format renders tools for a template that takes none. The tool-call branch is Qwen2.5's.
HERMES_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with \
function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": \
<args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or \
(message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


@contextmanager
def server(command: list[str], env: dict[str, str], url: str) -> Iterator[None]:
    """A server process, ready on `url`; its log's tail is printed when it fails to start."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        try:
            try:
                wait_ready(url, proc, seconds=900)
            except RuntimeError:
                log.seek(0)
                sys.stderr.write(log.read().decode(errors="replace")[-3000:])
                raise
            yield
        finally:
            proc.terminate()
            proc.wait(timeout=120)


def run_cases(url: str, cases: list[dict], tool_choice: str, label: str, args: argparse.Namespace) -> list[dict]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", timeout=900, max_retries=0)
    extra: dict[str, Any] = {"parallel_tool_calls": False} if args.single_call else {}

    def one(case: dict) -> dict:
        started = time.perf_counter()
        try:
            reply: Any = client.chat.completions.create(
                model="glm-4", messages=case["messages"], tools=case["tools"], tool_choice=tool_choice,
                temperature=0, max_tokens=MAX_TOKENS, **extra)
        except openai.OpenAIError as error:
            reply = error
        seconds = time.perf_counter() - started
        verdict = score(case, reply)
        print(f"  {label} {tool_choice} {case['id']}: {'ok' if verdict['full'] else verdict['error']} "
              f"({seconds:.1f} s)", file=sys.stderr, flush=True)
        return {"id": case["id"], "seconds": seconds, **verdict, "reply": reply_record(reply)}

    with ThreadPoolExecutor(args.concurrency) as pool:
        return list(pool.map(one, cases))


def summary(results: list[dict]) -> dict[str, Any]:
    n = len(results)
    return {"cases": n, "function": sum(r["function"] for r in results) / n,
            "full": sum(r["full"] for r in results) / n, "valid_json": sum(r["valid_json"] for r in results) / n,
            "latency_s": statistics.mean(r["seconds"] for r in results),
            "errors": dict(Counter(r["error"] for r in results if r["error"]).most_common())}


def report(rows: dict[tuple[str, str], list[dict]], model: Path, args: argparse.Namespace,
           final: bool = False) -> None:
    """The table (to stderr after each pass, to stdout at the end) and --out (rewritten after each pass)."""
    out = sys.stdout if final else sys.stderr
    cases = len(next(iter(rows.values()))) if rows else 0
    print(f"\n{model.name}, {cases} cases from {args.cases.name}, temperature 0, max_tokens {MAX_TOKENS}, "
          f"{args.threads} threads, {args.concurrency} request(s) at a time", file=out)
    print("| server | tool_choice | function | full | valid JSON | mean latency s | failures |", file=out)
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |", file=out)
    summaries = {}
    for (label, choice), results in rows.items():
        s = summary(results)
        summaries[f"{label} / {choice}"] = s
        errors = ", ".join(f"{k} {v}" for k, v in s["errors"].items()) or "-"
        print(f"| {label} | {choice} | {s['function']:.1%} | {s['full']:.1%} | {s['valid_json']:.1%} | "
              f"{s['latency_s']:.2f} | {errors} |", file=out, flush=True)
    if args.out:
        args.out.write_text(json.dumps({"model": model.name, "summaries": summaries,
                                        "cases": {f"{label} / {choice}": results
                                                  for (label, choice), results in rows.items()}}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"),
                        help="path to the llama-server binary (default: $LLAMA_SERVER)")
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: the bundled SmolLM2)")
    parser.add_argument("--servers", nargs="+", default=["llama", "llama-hermes", "glmstack"],
                        choices=["llama", "llama-hermes", "glmstack"])
    parser.add_argument("--llama-required", action="store_true", help='also run llama-server with "required"')
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--single-call", action="store_true",
                        help="send parallel_tool_calls=false (default: not sent, both servers allow several calls)")
    parser.add_argument("--cases", type=Path, default=DATA)
    parser.add_argument("--concurrency", type=int, default=1,
                        help="requests in flight at once (default 1: one after another)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N cases")
    parser.add_argument("--out", type=Path, default=None, help="write per-case results here (JSON)")
    parser.add_argument("--write-data", action="store_true", help="regenerate --cases from CASES and exit")
    args = parser.parse_args()
    if args.write_data:
        cases = build_cases()
        for case in cases:
            check_case(case)
        args.cases.write_text("".join(json.dumps(case, ensure_ascii=False) + "\n" for case in cases))
        print(f"wrote {len(cases)} cases to {args.cases}")
        return
    cases = [json.loads(line) for line in args.cases.read_text().splitlines() if line.strip()][:args.limit]
    model = args.model or bundled_model_path()
    if model is None:
        parser.error("no --model and the bundled model is not installed")
    if {"llama", "llama-hermes"} & set(args.servers) and not args.llama_server:
        parser.error("llama-server rows need --llama-server or $LLAMA_SERVER")
    llama_choices = ["auto", "required"] if args.llama_required else ["auto"]

    rows: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        template = Path(scratch) / "smollm2-hermes.jinja"
        template.write_text(HERMES_TEMPLATE)
        for name in args.servers:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            if name == "glmstack":
                env["GLMSTACK_HOME"] = scratch
                command = [sys.executable, "-m", "glmstack.cli", "serve", "--port", str(port), "--model", str(model)]
                choices = ["auto", "required"]
                label = "glmstack serve"
            else:
                command = [args.llama_server, "--jinja", "-m", str(model), "-c", "4096", "-t", str(args.threads),
                           "--port", str(port), "--host", "127.0.0.1"]
                label = "llama-server --jinja"
                if name == "llama-hermes":
                    command += ["--chat-template-file", str(template)]
                    label += " (Hermes template)"
                choices = llama_choices
            print(" ".join(command), file=sys.stderr, flush=True)
            with server(command, env, url):
                for choice in choices:
                    rows[(label, choice)] = run_cases(url, cases, choice, name, args)
                    report(rows, model, args)

    report(rows, model, args, final=True)


if __name__ == "__main__":
    main()
