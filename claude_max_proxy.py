#!/usr/bin/env python3
"""claude-max-proxy: use a Claude Max or Pro subscription from any OpenAI or Anthropic client.

A small local HTTP daemon. It accepts requests on http://127.0.0.1:3456/v1/... in three API
dialects, streaming included: OpenAI Chat Completions (``/v1/chat/completions``), the Anthropic
Messages API (``/v1/messages``, what Claude Code and the Anthropic SDKs speak) and the OpenAI
Responses API (``/v1/responses``, what Codex and the Agents SDK speak). For each request it runs
the official Claude Code CLI (``claude -p``, logged in with your own subscription) as a
subprocess, and answers in the dialect it was asked in.

Run it::

    python3 claude_max_proxy.py                 # serves http://127.0.0.1:3456/v1
    python3 claude_max_proxy.py --help          # every flag, each with an environment variable

Then point any OpenAI client at ``http://127.0.0.1:3456/v1``, or an Anthropic one (Claude Code
included: ``ANTHROPIC_BASE_URL``) at ``http://127.0.0.1:3456`` (any API key string will do).

The promise: this is one file that needs nothing but Python 3.9+ and its standard library, plus
the ``claude`` CLI, installed and logged in. Copy it anywhere and run it.

What it guards:

* It binds to 127.0.0.1 by default and will not listen anywhere else without an API key
  (``--api-key``). It is a personal tool: it is not meant to face the internet.
* API callers get a model, never an agent: the CLI runs with no built-in tools, no MCP servers, no
  slash commands, permission prompts answered "no", in a private empty working directory, and the
  prompt travels on stdin, never on the command line. Nothing a caller sends can make Claude read
  or change files or run commands. A caller's own functions (function calling) reach the model
  through this same file run as an MCP server (``mcp-bridge``) that lists them and runs nothing:
  the model's calls go back to the caller, which runs them, as with the real APIs.
* Your own Claude Code setup stays yours: the CLI reads none of your settings, ``CLAUDE.md``
  memory, hooks, output styles, agents, skills, plugins or MCP servers, and keeps no memory or
  transcript, unless you opt in to your user settings with ``--user-settings``.
* Web pages cannot use it through your browser: foreign ``Origin`` headers, cross-site fetches
  and unknown ``Host`` names (DNS rebinding) are refused, and POST bodies must be
  ``application/json``.
* Load is bounded: a few CLI processes at once (``--max-concurrency``), a fair queue behind them,
  capped bodies and connections, and deadlines for slow clients. On SIGTERM it lets answers in
  flight finish, then ends every CLI it started.
* A request does not wait for a CLI to start: a few are started ahead and wait on stdin
  (``--warm``, WarmPool), for the request shapes in use and a conversation's next turn; they
  give way to any request that needs their slot and never grow stale.
* Your subscription stays yours: it knows where the five-hour and weekly windows stand
  (``/v1/usage``, the API's rate-limit headers), can keep a share of them for you
  (``--reserve``), and never lets requests run on paid extra usage unless told so.
* Logs name methods, paths, statuses, models, durations and token counts, never prompts or answers.

See README.md for configuration, the launchd agent, and the exact translation rules.

The map. One request goes down this pipeline; each step is one section below, in this order:

    HTTP request --StrictHTTPHandler--> JSON body --ProxyHandler: who may ask, route-->
    Dialect.parse --> Request (neutral) --> Launch (argv, environment, stdin)
    --ClaudeRun: a slot, a ClaudeProcess (fresh, or a warm one)--> stream-json lines
    --AnswerFold--> events
    (Start, Text, Thinking, ToolCall, ToolInput, Revised, Finish) --the dialect's Answer-->
    SSE bytes or one body

    (with tools: the CLI starts `claude_max_proxy.py mcp-bridge FILE`, see bridge_main)

Sections, each under a banner of its own, in this order (a test keeps this list and the file
in step):

    Settings
    Errors
    The neutral request: what every dialect's parsing gives (pure functions)
    Conversations as real turns: the history as a Claude Code session (pure functions)
    The CLI launch: flags, environment, stdin, the MCP bridge (pure functions)
    CLI events -> completion events: AnswerFold, Ledger, Outbox (pure functions)
    Dialects: each API's parsing, Answer and Dialect, and the registry (pure functions)
    Who may use it: keys, browsers, host names (pure functions)
    Files the CLI uses: working directories, conversations' sessions (Sessions)
    CLI processes: ClaudeCLI, ClaudeProcess, ProcessSlots, WarmPool, ClaudeRun
    The subscription: its windows, what was spent, the login (Subscription, Login)
    What a person sees: the `status` command and the status page (pure functions)
    HTTP: ProxyServer, StrictHTTPHandler, ProxyHandler
    Command line
    Running at login: `service install`, `uninstall`, `status` (launchd or systemd --user)
    Running it: main()

A security reviewer reads: "The CLI launch" (the flags that make the CLI a model, never an
agent, and keep the user's ~/.claude out; bridge_names and bridge_main, through which a
caller's functions are offered and never run), "Who may use it" (Access: keys, browsers,
host names), StrictHTTPHandler (request framing and limits), and ClaudeProcess
(process groups, the private working directory, stdin).
"""

import argparse
import base64
import binascii
import collections
import contextlib
import email.errors
import email.message
import hashlib
import hmac
import html
import http.client
import ipaddress
import json
import logging
import operator
import os
import plistlib
import re
import select
import selectors
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import (Any, Callable, Dict, Generator, Iterable, Iterator, List, Mapping, NamedTuple,
                    NoReturn, Optional, Tuple, Union)
from urllib.parse import unquote

__version__ = "0.1.0"

log = logging.getLogger("claude_max_proxy")


##############################################################################
# Settings
##############################################################################

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3456
DEFAULT_TIMEOUT = 900.0  # seconds a whole request may take, CLI start to last byte
DEFAULT_IDLE_TIMEOUT = 300.0  # seconds the CLI may stay silent (it may think for minutes)

# After a result the CLI exits by itself; give it this long before signalling it.
EXIT_GRACE = 5.0
# Between SIGTERM and SIGKILL when a CLI process group has to be ended.
KILL_GRACE = 2.0
# `claude --version` at start and on /health: the native binary answers in ~0.1-0.4 s.
VERSION_TIMEOUT = 15.0

# Who may connect and how much they may ask for; each has a flag (see parse_args).
DEFAULT_MAX_CONCURRENCY = 4  # CLI processes at once; each is a few hundred MB of memory
DEFAULT_MAX_QUEUE = 64  # chat requests waiting for a CLI slot; more get a 429 at once
DEFAULT_QUEUE_TIMEOUT = 60.0  # seconds a request may wait for a slot before its 429
DEFAULT_MAX_BODY = 32 * 1024 * 1024  # larger request bodies get a 413 without being read
DEFAULT_CLIENT_TIMEOUT = 60.0  # seconds a client may stay silent while sending its request
# After SIGTERM, seconds the requests in flight get to finish; launchd's ExitTimeOut in the
# plist (20 s) leaves room for this plus KILL_GRACE.
DEFAULT_SHUTDOWN_GRACE = 10.0
# CLI processes started ahead of requests (WarmPool), each for one of the most recently used
# request shapes: an idle CLI holds some 160-180 MB (measured, 2.1.331), so a few at most.
DEFAULT_WARM = 2
# Seconds a warm process waits for a request before it is replaced by a fresh one: what the CLI
# read at start (its settings, the login, the date) is never older than this.
DEFAULT_WARM_IDLE = 300.0
# A shape no request has used for this long gets no new warm process when its own expires.
WARM_KEY_KEPT = 1800.0
# Seconds a warm CLI gets to answer the control requests that set a request's model and system
# prompt (milliseconds, measured) before the request goes to a fresh CLI instead.
CONTROL_TIMEOUT = 5.0
# Seconds a request waits for a warm process of its shape that is being started at that moment.
WARM_START_WAIT = 2.0
# Seconds between the pool's checks that its waiting CLIs are alive (a waitid each, no wake-up of
# the CLIs): one killed meanwhile (the OOM killer, a crash, an upgrade) is replaced this soon.
WARM_CHECK_INTERVAL = 2.0
# Warm CLIs of one shape that may die in a row, unused, before the pool stops replacing them
# (until a request of that shape comes again): a CLI that dies at every start is no loop.
WARM_DEATHS = 2
# A warm CLI starts only once no request has been answered for this long: its start (~0.9
# CPU-seconds, measured) would otherwise slow the answers being streamed (2 cores: x1.9 the
# first-to-last delta time of a 2,000-delta answer).
WARM_QUIET = 0.1
# A repeatable shape taken again within this many seconds is in steady use (an agent's loop, a
# script): a second CLI is kept ready for it, so that a request that follows the previous one
# at once finds one while the first one's replacement waits for a quiet moment.
WARM_STEADY = 600.0

MAX_CONNECTIONS = 256  # open client connections; past it new ones get a 503 and are closed
QUEUE_RETRY_AFTER = 5  # Retry-After (seconds) on a 429 from a full or slow queue
CLIENT_CHECK_INTERVAL = 0.25  # seconds between hang-up checks of a client waiting in the queue
# A refused request body is still read and dropped, this long and this much at most, before the
# connection closes: closing with it unread resets the connection, which can destroy the answer
# (a 413, say) before the client has read it.
LINGER_SECONDS = 2.0
LINGER_BYTES = 64 * 1024 * 1024
MAX_CLI_LINE_BYTES = 64 * 1024 * 1024  # one stream-json line from the CLI; past it the CLI is ended
STDERR_TAIL_BYTES = 4096  # the end of the CLI's stderr, kept for error messages
READ_CHUNK = 65536

# Where the CLI is installed that launchd's short PATH (/usr/bin:/bin:/usr/sbin:/sbin) misses.
CLAUDE_SEARCH_PATHS = (
    "~/.claude/local/claude",  # `claude migrate-installer` / local install
    "~/.local/bin/claude",  # native installer
    "/opt/homebrew/bin/claude",  # Homebrew / npm -g on Apple silicon
    "/usr/local/bin/claude",  # Homebrew / npm -g on Intel Macs and most Linux
)

# OpenAI model name -> the CLI's --model value. The family aliases let the CLI pick the newest
# model of that family. Full ids ("claude-sonnet-4-5", "claude-opus-4-1-20250805") match
# FULL_MODEL_ID and are passed as given. Model ids: https://docs.claude.com/en/docs/about-claude/models
MODEL_ALIASES = {
    "claude-opus-4": "opus",
    "claude-sonnet-4": "sonnet",
    "claude-haiku-4": "haiku",
    "opus": "opus",
    "sonnet": "sonnet",
    "haiku": "haiku",
}
FULL_MODEL_ID = re.compile(
    r"claude-(?:\d+(?:-\d+)?-(?:opus|sonnet|haiku)(?:-\d+)*|(?:opus|sonnet|haiku)(?:-\d+)+)"
    r"(?:-latest)?(?:\[1m\])?"
)
# Prefixes that clients and routers put in front of model names.
PROVIDER_PREFIXES = ("openai/", "anthropic/", "claude-code-cli/", "claude-max/")
MODELS_CREATED = 1747267200  # a fixed `created` for /v1/models entries (2025-05-15)

# Types the Anthropic API accepts in base64 image and document blocks.
IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
DOCUMENT_MEDIA_TYPES = ("application/pdf",)

# Sampling fields are accepted and ignored, as the CLI has no switch for them (temperature,
# top_p, top_k, penalties, seed, user, logit_bias, metadata), but only within the range the
# dialect's own API accepts: out of it they are a 400 there too.
NUMBER_RANGES = {"temperature": (0, 2), "top_p": (0, 1), "presence_penalty": (-2, 2),
                 "frequency_penalty": (-2, 2)}
ANTHROPIC_NUMBER_RANGES = {"temperature": (0, 1), "top_p": (0, 1), "top_k": (0, 2 ** 31 - 1)}
MAX_TOKENS_LIMIT = 2 ** 31 - 1  # the CLI reads CLAUDE_CODE_MAX_OUTPUT_TOKENS as an int32
MAX_STOP_SEQUENCES = 16  # Messages API stop_sequences (Chat Completions allows 4)

# The CLI's --effort values, and what OpenAI's reasoning effort and Anthropic's thinking budget
# become: "none" and "minimal" cannot turn the CLI's adaptive thinking off, so they are "low".
EFFORTS = ("low", "medium", "high", "xhigh", "max")
OPENAI_EFFORTS = {"none": "low", "minimal": "low", "low": "low", "medium": "medium",
                  "high": "high", "xhigh": "xhigh", "max": "max"}
THINKING_BUDGETS = ((2048, "low"), (8192, "medium"), (24576, "high"), (49152, "xhigh"),
                    (MAX_TOKENS_LIMIT, "max"))  # budget_tokens up to N -> effort

# Anthropic's error type for an HTTP status (https://docs.claude.com/en/api/errors).
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                         403: "permission_error", 404: "not_found_error",
                         413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                         529: "overloaded_error"}
IMAGE_TOKENS = 1600  # /v1/messages/count_tokens counts an image as this (a ~1 MP image)

# Responses kept in memory for `previous_response_id` (the oldest go first).
RESPONSE_STORE_ITEMS = 256
RESPONSE_STORE_BYTES = 64 * 1024 * 1024

# Function calling: the client's functions reach the model as the tools of one MCP server, this
# same file run by the CLI as `claude_max_proxy.py mcp-bridge FILE` (see bridge_main). The model
# sees each as mcp__proxy__<name>; its calls go back under the client's own names. The bridge
# runs nothing: the CLI ends at the model's first turn that calls a tool (--max-turns 1), and a
# call it does try is answered with an error.
BRIDGE_SERVER = "proxy"
BRIDGE_PREFIX = "mcp__%s__" % BRIDGE_SERVER
OPENAI_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
ANTHROPIC_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,128}")
CLI_TOOL_NAME_LIMIT = 64  # a longer bridged name gets a short alias (see bridge_names)
MAX_TOOLS = 512
STRUCTURED_OUTPUT_TOOL = "StructuredOutput"  # the CLI's own tool for --json-schema
# A freeform ("custom") tool is offered as a function of one string.
CUSTOM_TOOL_SCHEMA = {"type": "object", "properties": {"input": {
    "type": "string", "description": "The tool's whole input, as free text."}},
    "required": ["input"]}
# Tool types of the APIs that run on their provider's servers: the CLI cannot offer them, so
# they are left out of what the model sees (logged once each), never a failed request.
HOSTED_TOOL_TYPES = re.compile(
    r"(web_search|web_fetch|file_search|computer|code_interpreter|code_execution|image_generation"
    r"|mcp|local_shell|shell|apply_patch|bash|text_editor|memory|tool_search)(_.*)?")

BRIDGE_SCRIPT = os.path.abspath(__file__)
# How the CLI starts the bridge: bridge_main alone, compiled from this file (see its
# docstring), with -I -S: no environment variables, user or site packages.
# sys.argv: ["-c", this file, "mcp-bridge", TOOLS_FILE, VERSION].
BRIDGE_START = ("import sys; p = sys.argv[1]; s = open(p, encoding='utf-8').read(); "
                "a = s.index('\\ndef bridge_main('); b = s.index('\\ndef ', a + 1); n = {}; "
                "exec(compile(s[a:b], p, 'exec'), n); sys.exit(n['bridge_main'](sys.argv[3:]))")
WORKDIR_PREFIX = "claude-max-proxy-"  # of each daemon's private directory, in the temp dir
SHARED_DIR = "claude-max-proxy.%d"  # this user's directory shared by daemons (see shared_dir)
PREAMBLES_FILE = "preambles.json"  # in it: the session preambles learnt (see Sessions)
PREAMBLES_KEPT = 32  # of today's: one per CLI, model and settings in use
LEARN_WAIT = 1.0  # seconds an answer may wait for the CLI to write the session it learns from
SESSION_FILE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
MAX_SCHEMA_BYTES = 64 * 1024  # --json-schema goes on the command line (128 KiB per argument)

# The subscription (see Subscription). What the CLI last reported of its windows, kept in
# shared_dir() so that a restarted daemon knows it; `claude auth status` asked at most this often.
USAGE_FILE = "subscription.json"
LOGIN_CHECK_INTERVAL = 60.0
DEFAULT_RESERVE = 0  # percent of each window kept for the user's own use (--reserve); 0: none
REQUEST_LOG_SIZE = 50  # requests the status page lists (their figures only, no text)
# Windows --reserve keeps a share of, and the header abbreviation the API uses for each (the
# anthropic-ratelimit-unified-5h-* and -7d-* headers).
RESERVED_WINDOWS = {"five_hour": "5h", "seven_day": "7d"}
WINDOW_NAMES = {"five_hour": "5-hour", "seven_day": "weekly", "seven_day_opus": "weekly Opus",
                "seven_day_sonnet": "weekly Sonnet"}
# A window in extra usage whose reset time the CLI did not say: refused this long at most.
OVERAGE_FALLBACK_SECONDS = 5 * 3600

# Anthropic stop_reason -> OpenAI finish_reason.
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "refusal": "content_filter",
}


##############################################################################
# Errors
##############################################################################

class APIError(Exception):
    """A failure the client is told about, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: Optional[str] = None, param: Optional[str] = None,
                 retry_after: Optional[int] = None, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retry_after = retry_after
        self.headers = dict(headers or {})
        if retry_after is not None:
            self.headers["Retry-After"] = str(retry_after)

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


class ClientDisconnected(Exception):
    """The HTTP client went away; the CLI working for it is ended."""


def invalid(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


##############################################################################
# The neutral request: what every dialect's parsing gives (pure functions)
##############################################################################

Block = Dict[str, Any]  # an Anthropic content block: text, image, document
Turn = Tuple[str, List[Block]]  # (role, its blocks): "user" or "assistant"


class Tool(NamedTuple):
    """One of the client's functions, as the model is offered it."""
    name: str  # the client's own name for it
    description: str
    schema: Dict[str, Any]  # JSON Schema of its input, an object
    custom: bool = False  # freeform: its input is one string (CUSTOM_TOOL_SCHEMA's `input`)
    namespace: Optional[str] = None  # Responses: the namespace it came in

    @property
    def key(self) -> str:
        """Unique among a request's tools: what the bridge names it (before any alias)."""
        return "%s__%s" % (self.namespace, self.name) if self.namespace else self.name


class Request(NamedTuple):
    """What a client asks for, in no dialect's terms; each dialect's parse() makes one."""
    model: str  # the name the client asked for, provider prefix stripped
    cli_model: str  # what --model gets
    system: Optional[str]  # appended to Claude Code's system prompt
    turns: List[Turn]  # the conversation, the last turn the user's
    stream: bool = False
    max_tokens: Optional[int] = None
    stop: Tuple[str, ...] = ()
    effort: Optional[str] = None  # --effort
    include_usage: bool = False  # Chat Completions: a usage chunk ends the stream
    echo: Dict[str, Any] = {}  # fields a dialect repeats in its answer (Responses)
    tools: Tuple[Tool, ...] = ()  # offered to the model (none with tool_choice "none")
    tool_choice: str = "auto"  # "auto", "required" (some tool) or a Tool.key
    parallel_tools: bool = True  # False: at most one call in an answer
    output_schema: Optional[Dict[str, Any]] = None  # the answer is JSON of this schema


def resolve_model(name: Any) -> Tuple[str, str]:
    """Return (model name without provider prefix, the CLI's --model value) or raise a 404."""
    if not isinstance(name, str) or not name.strip():
        raise invalid("model", "`model` is required and must be a non-empty string.")
    model = name.strip()
    for prefix in PROVIDER_PREFIXES:
        if model.lower().startswith(prefix):
            model = model[len(prefix):]
            break
    key = model.lower()
    if key in MODEL_ALIASES:
        return model, MODEL_ALIASES[key]
    if FULL_MODEL_ID.fullmatch(key):
        return model, model
    raise APIError(
        404,
        "The model %r does not exist or is not served by this proxy. Use one of %s, or a full "
        "Claude model id such as claude-sonnet-4-5 or claude-opus-4-1-20250805." % (
            name[:200], ", ".join(sorted(MODEL_ALIASES))),
        code="model_not_found", param="model")


def image_block(url: str, where: str) -> Block:
    """An image URL (data: or https:) as an Anthropic image block."""
    if url.startswith("data:"):
        header, sep, data = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        media_type = media_type.strip().lower()
        if not sep or encoding.strip().lower() != "base64":
            raise invalid(where, "Image data URLs must look like data:image/png;base64,....")
        return base64_block("image", media_type, data, where)
    if url.startswith("https://"):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise invalid(where, "Image URLs must be https: URLs or base64 data: URLs.")


def base64_block(kind: str, media_type: Any, data: Any, where: str) -> Block:
    """An image or document block with base64 data, checked as the Messages API would."""
    allowed = IMAGE_MEDIA_TYPES if kind == "image" else DOCUMENT_MEDIA_TYPES
    if media_type not in allowed:
        raise invalid(where, "Unsupported %s type %r; use one of %s."
                      % (kind, str(media_type)[:50], ", ".join(allowed)))
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise invalid(where, "The %s data is not valid base64." % kind) from None
    return {"type": kind, "source": {"type": "base64", "media_type": media_type, "data": data}}


def text_of(blocks: Iterable[Block]) -> str:
    return "".join(b["text"] for b in blocks if b["type"] == "text")


def join_blocks(blocks: List[Block]) -> Union[str, List[Block]]:
    """Merge neighbouring text blocks; a lone text block becomes a plain string."""
    merged: List[Block] = []
    for block in blocks:
        if block["type"] == "text" and merged and merged[-1]["type"] == "text":
            merged[-1] = {"type": "text", "text": merged[-1]["text"] + block["text"]}
        else:
            merged.append(block)
    if not merged:
        return ""
    if len(merged) == 1 and merged[0]["type"] == "text":
        return str(merged[0]["text"])
    return merged


TRANSCRIPT_HEAD = (
    "The conversation so far is given below inside <conversation> tags, one <message> element "
    "per earlier turn. Continue it: answer the user's latest message, which follows the "
    "transcript.\n\n<conversation>\n"
)
TRANSCRIPT_TAIL = "</conversation>\n\n"


def check_turns(turns: List[Turn], where: str) -> None:
    """The conversation must end with a user turn that has something in it, and each tool
    result must answer a call made before it."""
    if not turns or turns[-1][0] != "user":
        raise invalid(where, "The last message (other than system messages) must have role "
                      "`user`.")
    if not any(b["type"] != "text" or b["text"].strip() for b in turns[-1][1]):
        # The Messages API refuses empty text; say so before starting a CLI for it.
        raise invalid(where, "The last user message is empty.")
    called: "set[str]" = set()
    for role, blocks in turns:
        for block in blocks:
            if block["type"] == "tool_use":
                called.add(block["id"])
            elif block["type"] == "tool_result" and block["tool_use_id"] not in called:
                raise invalid(where, "The tool result for %r answers no tool call made before "
                              "it." % block["tool_use_id"][:80])


def tool_text(block: Block, names: Mapping[str, str]) -> List[Block]:
    """A tool_use or tool_result block as transcript text (its images kept as they are)."""
    if block["type"] == "tool_use":
        name = names.get(block["name"], block["name"])
        return [{"type": "text", "text": '\n<tool_call id="%s" name="%s">\n%s\n</tool_call>\n' % (
            block["id"], name, json.dumps(block["input"], ensure_ascii=False))}]
    error = ' is_error="true"' if block.get("is_error") else ""
    return ([{"type": "text", "text": '<tool_result tool_call_id="%s"%s>\n' % (
        block["tool_use_id"], error)}] + list(block["content"]) +
        [{"type": "text", "text": "\n</tool_result>\n"}])


def as_text(blocks: List[Block], names: Mapping[str, str]) -> List[Block]:
    out: List[Block] = []
    for block in blocks:
        out.extend(tool_text(block, names) if block["type"] in ("tool_use", "tool_result")
                   else [block])
    return out


TOOL_RESULTS_TAIL = ("The results of your tool calls are in the last message above. Continue "
                     "from them: call more tools if you need to, or answer.")


def prompt_content(turns: List[Turn], names: Mapping[str, str] = {}
                   ) -> Union[str, List[Block]]:
    """The one user turn the CLI gets: a lone user message as it is; a longer conversation as
    a transcript of the earlier turns, each in a <message role="..."> element inside
    <conversation> tags, followed by the last (user) message. Tool calls and results are
    <tool_call> and <tool_result> elements, a call under the name the model knows it by
    (`names`: client name -> offered name); a last message of only tool results goes into
    the transcript, followed by TOOL_RESULTS_TAIL."""
    *earlier, (_, last) = turns
    if not any(b["type"] != "tool_result" for b in last):
        earlier, last = list(turns), [{"type": "text", "text": TOOL_RESULTS_TAIL}]
    if not earlier:
        return join_blocks(last)
    blocks = [{"type": "text", "text": TRANSCRIPT_HEAD}]
    for role, turn in earlier:
        blocks.append({"type": "text", "text": '<message role="%s">\n' % role})
        blocks.extend(as_text(turn, names))
        blocks.append({"type": "text", "text": "\n</message>\n"})
    blocks.append({"type": "text", "text": TRANSCRIPT_TAIL})
    blocks.extend(as_text(last, names))
    return join_blocks(blocks)


def optional_int(body: Dict[str, Any], field: str, minimum: int, maximum: int) -> Optional[int]:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise invalid(field, "`%s` must be a whole number from %d to %d." % (
            field, minimum, maximum))
    return value


def check_numbers(body: Dict[str, Any], ranges: Mapping[str, Tuple[float, float]]) -> None:
    """Fields the CLI has no switch for are accepted, but only within the API's own range."""
    for field, (low, high) in ranges.items():
        value = body.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not low <= value <= high:
            raise invalid(field, "`%s` must be a number from %g to %g." % (field, low, high))


def check_type(body: Dict[str, Any], field: str, kind: Any, what: str) -> Any:
    """body[field] when it is absent, null or of `kind`; else a 400 saying it must be `what`."""
    value = body.get(field)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and
                              kind is not bool):
        raise invalid(field, "`%s` must be %s." % (field, what))
    return value


def stop_sequences(value: Any, field: str, most: int) -> Tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > most or \
            not all(isinstance(s, str) and s for s in stops):
        raise invalid(field, "`%s` must be a non-empty string or a list of at most %d of them."
                      % (field, most))
    return tuple(stops)


def openai_effort(value: Any, field: str) -> Optional[str]:
    """OpenAI's reasoning effort as the CLI's --effort (see EFFORTS)."""
    if value is None:
        return None
    if not isinstance(value, str) or value not in OPENAI_EFFORTS:
        raise invalid(field, "`%s` must be one of %s." % (field, ", ".join(OPENAI_EFFORTS)))
    return OPENAI_EFFORTS[value]


def tool_schema(value: Any, where: str) -> Dict[str, Any]:
    """A function's parameters as JSON Schema (absent: none); the top level is an object."""
    if value is None:
        return {"type": "object", "properties": {}}
    if not isinstance(value, dict) or value.get("type", "object") != "object":
        raise invalid(where, "`%s` must be a JSON Schema object with `type: object`." % where)
    return dict(value, type="object")


def make_tool(name: Any, description: Any, schema: Dict[str, Any], where: str,
              pattern: "re.Pattern[str]", custom: bool = False,
              namespace: Optional[str] = None) -> Tool:
    if not isinstance(name, str) or not pattern.fullmatch(name):
        raise invalid(where + ".name", "Tool names must be 1 to %d letters, digits, `_` or `-` "
                      "(got %r)." % (64 if pattern is OPENAI_TOOL_NAME else 128, str(name)[:80]))
    if description is not None and not isinstance(description, str):
        raise invalid(where + ".description", "A tool's `description` must be a string.")
    return Tool(name, description or "", schema, custom, namespace)


def offered_tools(tools: List[Tool], field: str) -> Tuple[Tool, ...]:
    """The request's tools, each name once, in a fixed order (the prompt's tool list is then
    the same for the same tools, as a cached prompt prefix needs)."""
    if len(tools) > MAX_TOOLS:
        raise invalid(field, "At most %d tools can be offered." % MAX_TOOLS)
    seen: Dict[str, Tool] = {}
    for tool in tools:
        if tool.key in seen:
            raise invalid(field, "Two tools are named %r." % tool.key)
        seen[tool.key] = tool
    return tuple(sorted(seen.values(), key=lambda t: t.key))


_LEFT_OUT: "set[str]" = set()


def leave_out(kind: str, dialect: str) -> None:
    """A hosted tool (web search, say) that the CLI cannot offer; said once per kind."""
    if kind not in _LEFT_OUT:
        _LEFT_OUT.add(kind)
        log.warning("%s tools of type %r run on the provider's servers and cannot be offered "
                    "through Claude Code: they are left out (said once).", dialect, kind[:50])


def choose_tools(tools: Tuple[Tool, ...], choice: str, field: str
                 ) -> Tuple[Tuple[Tool, ...], str]:
    """(the tools offered, the choice): "none" offers none; a named tool must be there."""
    if choice == "none":
        return (), "auto"  # nothing offered: nothing to choose
    if choice not in ("auto", "required") and choice not in {t.key for t in tools}:
        raise invalid(field, "`%s` names %r, which is not among the request's tools."
                      % (field, choice[:80]))
    return tools, choice if tools else "auto"


def output_schema(value: Any, where: str) -> Optional[Dict[str, Any]]:
    """An OpenAI output format ({"type": "text" | "json_object" | "json_schema"}) as the
    schema the answer must follow, or None for text. `json_object` is any object."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        # Chat nests it under `json_schema`; Responses' text.format holds it directly.
        spec = value.get("json_schema", value) if where == "response_format" else value
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict) or schema.get("type", "object") != "object":
            raise invalid(where, "A `json_schema` format needs a `schema` whose top level is "
                          "an object (`type: object`).")
        if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
            raise invalid(where, "The schema is larger than %d KiB." % (MAX_SCHEMA_BYTES // 1024))
        return dict(schema, type="object")
    raise invalid(where + ".type", "`%s` must be of type text, json_object or json_schema."
                  % where)


def tool_input(arguments: Any, where: str) -> Dict[str, Any]:
    """A call's arguments as the client sent them back (a JSON string) as its input object."""
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str):
        raise invalid(where, "`%s` must be a string of JSON." % where)
    if not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
    except (ValueError, RecursionError):
        raise invalid(where, "`%s` is not valid JSON." % where) from None
    if not isinstance(value, dict):
        raise invalid(where, "`%s` must be a JSON object." % where)
    return value


def tool_result(call_id: Any, content: List[Block], where: str,
                is_error: bool = False) -> Block:
    if not isinstance(call_id, str) or not call_id:
        raise invalid(where, "A tool result needs the id of its call.")
    block: Block = {"type": "tool_result", "tool_use_id": call_id, "content": content}
    if is_error:
        block["is_error"] = True
    return block


def add_to_turn(turns: List[Turn], role: str, blocks: List[Block]) -> None:
    """Blocks joined to the last turn when it has this role and holds tool blocks (an
    assistant's calls, the results that answer them), else a new turn."""
    if turns and turns[-1][0] == role and any(
            b["type"] in ("tool_use", "tool_result") for b in turns[-1][1] + blocks):
        turns[-1] = (role, turns[-1][1] + blocks)
    else:
        turns.append((role, blocks))


##############################################################################
# Conversations as real turns: the history as a Claude Code session (pure functions)
##############################################################################

# A request with history runs as `claude -p --resume ID` of a session file written for it, so
# the model gets the earlier turns as its own user and assistant messages, tool calls and
# results as tool_use and tool_result blocks. What 2.1.331 does with such a file (measured;
# EndToEndTest pins each point):
# - It sends the rows as they are, after the first user row the "attachment" rows it finds
#   there (their `rendered` text, verbatim: environment, model and date), then the new user
#   line from stdin, which alone carries the last cache breakpoint.
# - A fresh run sends [first user message, that same environment text]: so a session holding
#   the attachment rows the CLI wrote for a fresh run (the preamble, learnt from one) makes
#   the second request's prefix repeat the first's, and each later request's the one before.
# - A file ending with a user row gets a made-up "No response requested." answer before the
#   stdin line, and tool_result blocks on stdin are dropped: a last turn holding tool results
#   ends the file instead, stdin stays empty and RESUME_TURN_ENV has the CLI resume that turn,
#   which it does by adding CONTINUE_TEXT to it. Later requests write that text after the
#   turn, so their prefix repeats that request's too.
# - Consecutive user rows become one message (the CLI adds "\n" to the first one's text).
RESUME_TURN_ENV = "CLAUDE_CODE_RESUME_INTERRUPTED_TURN"
CONTINUE_TEXT = "Continue from where you left off."
SESSION_OPEN_TRIES = 5  # a session file's folder may be removed by another run as it is made
SESSION_VERSION = "2.1.331"  # written into the rows when the CLI's own version is unknown
WIRE_TOOL_ID = re.compile(r"[a-zA-Z0-9_-]{1,128}")  # what the Messages API takes as a call id
PREAMBLE_KEYS = ("type", "attachment", "rendered", "renderedRole")


Content = Union[str, List[Block]]  # a message's: one text as a string (join_blocks), or blocks


class History(NamedTuple):
    """A conversation as a session: the rows of the file, and the last turn for stdin (None:
    the file ends with it and the CLI resumes it, see RESUME_TURN_ENV)."""
    rows: List[Tuple[str, Content]]
    stdin: Optional[Content]


def wire_tool_id(call_id: str) -> str:
    """A client's call id as the Messages API takes it (some clients use dots or colons);
    always the same for the same id, so the call and its result still match."""
    if WIRE_TOOL_ID.fullmatch(call_id):
        return call_id
    return "toolu_" + hashlib.sha256(call_id.encode("utf-8")).hexdigest()[:24]


def model_tool_name(key: str, names: Mapping[str, str]) -> str:
    """The name the model knows a client's tool by; for one not offered in this request, the
    name it would have (calls in the history may name tools a client no longer sends)."""
    if key in names:
        return names[key]
    return BRIDGE_PREFIX + bridge_alias(key)


def bridge_alias(key: str) -> str:
    """What the bridge calls a tool: its key, or one that would make the model's name longer
    than CLI_TOOL_NAME_LIMIT shortened, ending in a hash of it."""
    room = CLI_TOOL_NAME_LIMIT - len(BRIDGE_PREFIX)
    if len(key) <= room:
        return key
    return "%s_%s" % (key[:room - 9], hashlib.sha256(key.encode()).hexdigest()[:8])


def real_blocks(blocks: List[Block], names: Mapping[str, str], tools: bool) -> List[Block]:
    """A turn's blocks as the model gets them: tool calls under the names it knows, with ids
    the API takes; as transcript text when no tools are offered (the API refuses tool blocks
    then). Empty text goes: the API refuses it."""
    out: List[Block] = []
    for block in blocks:
        kind = block["type"]
        if kind in ("tool_use", "tool_result") and not tools:
            out.extend(tool_text(block, names))
        elif kind == "tool_use":
            out.append({"type": "tool_use", "id": wire_tool_id(block["id"]),
                        "name": model_tool_name(block["name"], names), "input": block["input"]})
        elif kind == "tool_result":
            result: Block = {"type": "tool_result", "tool_use_id": wire_tool_id(
                block["tool_use_id"]), "content": [b for b in block["content"]
                                                   if b["type"] != "text" or b["text"].strip()]}
            if block.get("is_error"):
                result["is_error"] = True
            out.append(result)
        elif kind != "text" or block["text"].strip():
            out.append(block)
    return out


def has_results(blocks: List[Block]) -> bool:
    return any(block["type"] == "tool_result" for block in blocks)


def joined(turns: List[List[Block]]) -> List[Block]:
    """Consecutive user turns as the CLI makes one message of them: the earlier one's last
    text gains a newline."""
    out: List[Block] = []
    for blocks in turns:
        if out and blocks and out[-1]["type"] == "text":
            out[-1] = dict(out[-1], text=out[-1]["text"] + "\n")
        out.extend(blocks)
    return out


def conversation_history(turns: List[Turn], names: Mapping[str, str], tools: bool) -> History:
    """The turns of a request with history as session rows (see the notes above): the same
    earlier turns always give the same rows, so a conversation's requests share a prefix.
    Consecutive user turns are one row (a file ending with one user row of several would get
    "No response requested." between them); a user row with tool results is followed by
    CONTINUE_TEXT, as the CLI resumed it when it was the last."""
    groups: List[Turn] = []
    for role, blocks in turns:
        content = real_blocks(blocks, names, tools)
        if not content:
            continue
        if role == "user" and groups and groups[-1][0] == "user":
            groups[-1] = ("user", joined([groups[-1][1], content]))
        else:
            groups.append((role, content))
    # The last turn is the user's (check_turns) and not empty.
    *earlier, (_, last) = groups
    rows: List[Tuple[str, Content]] = []
    for role, content in earlier:  # a user's text alone as a string, as a lone prompt goes
        rows.append((role, join_blocks(content) if role == "user" else content))
        if role == "user" and has_results(content):
            rows.append(("user", [{"type": "text", "text": CONTINUE_TEXT}]))
    if has_results(last):
        rows.append(("user", join_blocks(last)))
        return History(rows, None)
    return History(rows, join_blocks(last))


def session_lines(history: History, preamble: List[Dict[str, Any]], session_id: str, cwd: str,
                  version: str, model: str, now: float) -> str:
    """The session file (JSON lines) for `history`: its rows chained by parentUuid, with
    `preamble` after the first user row (or last, when there is none), as the CLI writes its
    own."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + ".%03dZ" % (now % 1 * 1000)
    entries: List[Dict[str, Any]] = []
    placed = False
    for n, (role, blocks) in enumerate(history.rows):
        if role == "user":
            entries.append({"type": "user", "message": {"role": "user", "content": blocks}})
        else:
            entries.append({"type": "assistant", "message": {
                "id": "msg_proxy_%d" % n, "type": "message", "role": "assistant",
                "model": model, "content": blocks,
                "stop_reason": "tool_use" if any(isinstance(b, dict) and b["type"] == "tool_use"
                                                 for b in blocks)
                else "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": 0, "output_tokens": 0}}})
        if role == "user" and not placed:
            entries.extend(dict(row) for row in preamble)
            placed = True
    if not placed:
        entries.extend(dict(row) for row in preamble)
    parent = None
    lines = []
    for entry in entries:
        entry.update({"parentUuid": parent, "isSidechain": False, "uuid": str(uuid.uuid4()),
                      "timestamp": stamp, "userType": "external", "entrypoint": "sdk-cli",
                      "cwd": cwd, "sessionId": session_id, "version": version})
        parent = entry["uuid"]
        lines.append(json.dumps(entry, ensure_ascii=False) + "\n")
    return "".join(lines)


def learnt_preamble(text: str) -> Optional[List[Dict[str, Any]]]:
    """From a session file the CLI wrote for a fresh run: the attachment rows it put after
    the first user row, each with its rendered text (what the CLI sends of them), in order.
    None when there are none (a CLI that writes its files otherwise)."""
    rows: List[Dict[str, Any]] = []
    seen_user = False
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict):
            continue
        if row.get("type") == "user":
            if seen_user:
                break
            seen_user = True
        elif row.get("type") == "assistant":
            break
        elif seen_user and row.get("type") == "attachment" and isinstance(
                row.get("rendered"), list) and row["rendered"]:
            rows.append({key: row[key] for key in PREAMBLE_KEYS if key in row})
    return rows or None


##############################################################################
# The CLI launch: flags, environment, stdin, the MCP bridge (pure functions)
##############################################################################

def bridge_names(tools: Iterable[Tool]) -> Dict[str, Tool]:
    """What the bridge calls each tool (the model sees BRIDGE_PREFIX + that) -> the tool. A
    name that would make the model's name longer than CLI_TOOL_NAME_LIMIT gets a short alias
    ending in a hash of it; no name can reach anything but the bridge, as every one the model
    sees carries the bridge's prefix."""
    names: Dict[str, Tool] = {}
    for tool in tools:
        name = bridge_alias(tool.key)
        if name in names:
            raise invalid("tools", "The tool names %r and %r are too much alike to offer both."
                          % (names[name].key[:80], tool.key[:80]))
        names[name] = tool
    return names


def bridge_main(argv: "List[str]") -> int:
    """`claude_max_proxy.py mcp-bridge TOOLS_FILE [VERSION]`: the stdio MCP server the CLI
    starts for a request with tools. It lists the file's tools and runs none: a call is
    answered with an error (the CLI ends at the model's turn that asks, before any call would
    be made).

    The CLI waits for its MCP servers before it asks the model, so this start is on every
    request with tools. BRIDGE_START therefore compiles this function alone from the file's
    source (up to the next top-level def) and runs it: it must need nothing of the module
    (its imports are its own), which saves the module's imports (~100 ms measured)."""
    import json
    import sys
    if len(argv) not in (1, 2):
        sys.stderr.write("usage: claude_max_proxy.py mcp-bridge TOOLS_FILE [VERSION]\n")
        return 2
    version = argv[1] if len(argv) > 1 else "unknown"
    with open(argv[0], encoding="utf-8") as f:
        tools = json.load(f)
    out = sys.stdout
    for line in sys.stdin:
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if not isinstance(message, dict) or "id" not in message or "method" not in message:
            continue  # a notification, or a response to nothing we asked
        method, params = message["method"], message.get("params") or {}
        if method == "initialize":
            # The version the CLI asks for, else the one this was written against.
            result: Any = {"protocolVersion": params.get("protocolVersion", "2025-06-18"),
                           "capabilities": {"tools": {"listChanged": False}},
                           "serverInfo": {"name": "claude-max-proxy", "version": version}}
        elif method == "tools/list":
            result = {"tools": tools}
        elif method == "tools/call":
            result = {"isError": True, "content": [{"type": "text", "text": (
                "This tool is run by the API client, not here: the call was handed back.")}]}
        elif method == "ping":
            result = {}
        else:
            reply = {"jsonrpc": "2.0", "id": message["id"],
                     "error": {"code": -32601, "message": "Method not found"}}
            out.write(json.dumps(reply) + "\n")
            out.flush()
            continue
        out.write(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}) + "\n")
        out.flush()
    return 0


def tool_instructions(request: Request, names: Mapping[str, str]) -> str:
    """Told to the model with the system prompt when it is offered the client's tools: what
    they are, and the tool_choice, which the CLI has no switch for (so: best effort)."""
    if not request.tools:
        return ""
    parts = ["The tools whose names begin with %s are functions of the application you are "
             "talking to: calling one ends your turn, and the application runs it and gives "
             "you the result." % BRIDGE_PREFIX]
    if request.tool_choice == "required":
        parts.append("In this answer you must call at least one of those tools.")
    elif request.tool_choice != "auto":
        parts.append("In this answer you must call the tool %s." % names[request.tool_choice])
    if not request.parallel_tools:
        parts.append("Call at most one tool in this answer.")
    return " ".join(parts)


class SessionPlan(NamedTuple):
    """How a run uses a Claude Code session (see Sessions): `history` resumed from a file
    written for the run (a fresh run when it has no rows: a first turn), or None: a fresh
    run of the transcript; `learn`: the fresh run saves its session, read for its preamble."""
    history: Optional[History]
    preamble: List[Dict[str, Any]]
    key: str  # what the preamble depends on (Sessions.key)
    version: str  # the CLI's, as it says it
    learn: bool = False


class Launch(NamedTuple):
    """One CLI run, described: its command line, environment, files and stdin all derive from
    this."""
    claude: str  # the CLI's path
    request: Request
    user_settings: bool = False  # --user-settings
    session: Optional[SessionPlan] = None

    @property
    def resumed(self) -> Optional[History]:
        """The history the run resumes, if it does."""
        plan = self.session
        return plan.history if plan and plan.history and plan.history.rows and not plan.learn \
            else None

    def model_tools(self) -> Dict[str, Tool]:
        """The client's tools by the name the model sees (BRIDGE_PREFIX + the bridge's)."""
        return {BRIDGE_PREFIX + name: tool
                for name, tool in bridge_names(self.request.tools).items()}

    def offered_names(self) -> Dict[str, str]:
        """Each tool's key -> the name the model knows it by."""
        return {tool.key: name for name, tool in self.model_tools().items()}

    def files(self) -> Dict[str, str]:
        """The run's private files: "system" (the appended system prompt), "tools" (the
        bridge's tool list). Written beside the working directory for the run's length."""
        files = {}
        tools = self.model_tools()
        system = "\n\n".join(p for p in (self.request.system, tool_instructions(
            self.request, {tool.key: name for name, tool in tools.items()})) if p)
        if system:
            files["system"] = system
        if tools:
            files["tools"] = json.dumps([
                {"name": name[len(BRIDGE_PREFIX):], "description": tool.description,
                 "inputSchema": tool.schema} for name, tool in tools.items()],
                ensure_ascii=False)
        return files

    def argv(self, paths: Mapping[str, str]) -> List[str]:
        """A model with no tools but the client's, no slash commands or saved session, and
        none of the user's own Claude Code setup unless `user_settings`. `paths` are where
        the files() were written."""
        argv = [
            self.claude, "-p",
            "--input-format", "stream-json",
            "--output-format", "stream-json", "--verbose", "--include-partial-messages",
            "--model", self.request.cli_model,
            "--tools", "",  # none of the CLI's own: the client's come through the bridge
            "--strict-mcp-config",  # no MCP server but the bridge
            "--disable-slash-commands",
            "--permission-mode", "dontAsk",  # a tool call is denied, never run
            "--no-session-persistence",
        ]
        if self.resumed is not None:
            argv += ["--resume", paths["session"]]  # the file Sessions wrote; left unchanged
        elif self.session is not None and self.session.learn:
            argv.remove("--no-session-persistence")  # it saves its session: learnt from
            argv += ["--session-id", paths["session"]]
        # Measured with the real CLI 2.1.331 and a ~/.claude holding one of everything: each
        # flag alone leaves something through. `--setting-sources ""` keeps out settings,
        # hooks, output styles, agents and CLAUDE.md, but not auto-memory (a directory per
        # working directory under ~/.claude/projects, and its path in the system prompt; the
        # environment turns it off). `--safe-mode` ends memory, hooks, skills, agents,
        # plugins and output styles, but still applies settings.json's `env` block. Both
        # together let nothing through; the OAuth login is not a setting and still works.
        # `--safe-mode` also turns off every MCP server, the bridge too, so a request with
        # tools runs without it (EndToEndTest checks that nothing comes through either way).
        if self.user_settings:
            argv += ["--setting-sources", "user"]  # the user's scope only: no project, local
        elif self.request.tools:
            argv += ["--setting-sources", ""]
        else:
            argv += ["--safe-mode", "--setting-sources", ""]
        if self.request.tools:
            server = {"type": "stdio", "command": sys.executable or "python3",
                      "args": ["-I", "-S", "-c", BRIDGE_START, BRIDGE_SCRIPT, "mcp-bridge",
                               paths["tools"], __version__]}
            argv += ["--mcp-config", json.dumps({"mcpServers": {BRIDGE_SERVER: server}}),
                     # Ends the run after the model's first turn: the CLI denies the calls
                     # (dontAsk) and would otherwise ask the model again, a wasted turn.
                     "--max-turns", "1"]
        if self.request.output_schema is not None:
            argv += ["--json-schema", json.dumps(self.request.output_schema,
                                                 ensure_ascii=False)]
        if self.request.effort:
            argv += ["--effort", self.request.effort]
        if "system" in paths:
            # A file, not an argument: Linux caps one argument at 128 KiB.
            argv += ["--append-system-prompt-file", paths["system"]]
        return argv

    def environment(self, base: Dict[str, str]) -> Dict[str, str]:
        env = dict(base)
        # Set inside Claude Code sessions; older CLIs refuse to start nested when they see it.
        env.pop("CLAUDECODE", None)
        # No auto-memory even with --user-settings: it would write under ~/.claude for every
        # request and put a path that differs per run into the system prompt.
        env["CLAUDE_CODE_DISABLE_AUTO_MEMORY"] = "1"
        if self.request.max_tokens is not None:
            env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] = str(self.request.max_tokens)
        if self.request.tools:
            # Else the CLI may defer MCP tools behind its own ToolSearch tool, which is off.
            env["ENABLE_TOOL_SEARCH"] = "false"
        if self.resumed is not None and self.resumed.stdin is None:
            env[RESUME_TURN_ENV] = "1"  # the last turn is the session's: the CLI resumes it
        else:
            env.pop(RESUME_TURN_ENV, None)
        return env

    def stdin(self) -> bytes:
        """The one stream-json user line the CLI reads from stdin: the last turn of a session
        (nothing when a resumed one ends with it), else the whole conversation."""
        history = self.session.history if self.session else None
        content: Content
        if history is None:
            content = prompt_content(self.request.turns, self.offered_names())
        elif history.stdin is None:
            return b""
        else:
            content = history.stdin
        line = {"type": "user", "message": {"role": "user", "content": content}}
        return json.dumps(line, ensure_ascii=False).encode("utf-8") + b"\n"


def warm_key(launch: Launch, strict: bool = False) -> Optional[str]:
    """What a CLI process is bound to from its start on, which a request must match to take a
    warm one (WarmPool): its command line, environment and tool list, a resumed session's rows,
    the day (in its environment note). Not the model or the appended system prompt: a waiting
    CLI takes both on stdin (stdin_controls) and then sends the API what a CLI started with
    them sends, byte for byte (measured with 2.1.331 for every family and for a system prompt
    set, changed and removed), unless `strict`. None for a run that cannot wait warm: one that
    saves its session to learn the preamble from."""
    plan = launch.session
    if plan is not None and plan.learn:
        return None
    argv = launch.argv({"system": "", "tools": "", "session": ""})
    files = launch.files()
    if not strict:
        at = argv.index("--model")
        del argv[at:at + 2]
        if "--append-system-prompt-file" in argv:
            at = argv.index("--append-system-prompt-file")
            del argv[at:at + 2]
        files.pop("system", None)
    bound: List[Any] = [argv, sorted(launch.environment({}).items()), files,
                        time.strftime("%Y-%m-%d")]
    history = launch.resumed
    if plan is not None and history is not None:
        bound += [launch.request.cli_model, history.rows, plan.preamble, plan.version]
    return hashlib.sha256(json.dumps(bound, ensure_ascii=False, sort_keys=True)
                          .encode("utf-8")).hexdigest()


def stdin_controls(launch: Launch, spawned: Launch) -> List[Dict[str, Any]]:
    """The control requests (stream-json, as the Agent SDK sends them) that make a CLI started
    for `spawned` run `launch` instead: its appended system prompt ("" removes one) and its
    model."""
    controls: List[Dict[str, Any]] = []
    system = launch.files().get("system", "")
    if system != spawned.files().get("system", ""):
        controls.append({"subtype": "initialize", "appendSystemPrompt": system})
    if launch.request.cli_model != spawned.request.cli_model:
        controls.append({"subtype": "set_model", "model": launch.request.cli_model})
    return controls


##############################################################################
# CLI events -> completion events: AnswerFold, Ledger, Outbox (pure functions)
##############################################################################

class Start(NamedTuple):
    """The model began answering (the CLI's first message_start)."""
    model: str
    usage: Dict[str, Any] = {}  # the first message's token counts so far (its input)


class Text(NamedTuple):
    """More of the answer's text, to be appended to what came before."""
    text: str


class Thinking(NamedTuple):
    """More of the model's visible reasoning (its thinking blocks), in order."""
    text: str


class ToolCall(NamedTuple):
    """The model calls one of the client's tools: a new block, its input (JSON text) follows
    as ToolInput pieces."""
    id: str
    name: str  # the client's name for the tool
    namespace: Optional[str] = None
    custom: bool = False  # a freeform tool: its input is the string in {"input": ...}


class ToolInput(NamedTuple):
    """More of the current tool call's input, JSON text to be appended."""
    text: str


class Revised(NamedTuple):
    """The answer settled differently from what was already sent: after the API stream broke,
    the CLI's retry produced other words. `blocks` is the whole answer as it now stands, as
    (kind, text) pairs, and `calls` the ToolCall of each tool_use block among them (by
    index): a collected answer is replaced by it; a stream cannot take back what it sent, and
    ends with an error."""
    blocks: Tuple[Tuple[str, str], ...]
    calls: Tuple[Tuple[int, ToolCall], ...] = ()

    @property
    def text(self) -> str:
        return "".join(text for kind, text in self.blocks if kind == "text")


class Finish(NamedTuple):
    stop_reason: Optional[str]  # Anthropic's
    usage: Dict[str, Any]  # Anthropic-style token counts
    cut_short: bool = False  # the proxy ended it (stop sequence, max_tokens): the CLI still runs
    stop_sequence: Optional[str] = None  # the one that matched


Event = Union[Start, Text, Thinking, ToolCall, ToolInput, Revised, Finish]


class ControlRefused(Exception):
    """A warm CLI did not take a control request (a CLI without them): the request goes to a
    fresh one."""


class CLIEndedWithoutResult(Exception):
    """stdout closed before a `result` line; the caller knows the exit code and stderr."""


class StopSequences:
    """Cuts streamed text at the first stop sequence, holding back only what could start one."""

    def __init__(self, stops: Iterable[str]):
        self.stops = tuple(stops)
        self.pending = ""
        self.hit = False
        self.matched: Optional[str] = None

    def feed(self, text: str) -> str:
        """Text that is safe to emit now; after a hit, `hit` is True and nothing more comes."""
        if not self.stops:
            return text
        buffer = self.pending + text
        found = [(i, stop) for stop, i in ((s, buffer.find(s)) for s in self.stops) if i >= 0]
        if found:
            cut, self.matched = min(found)
            self.hit, self.pending = True, ""
            return buffer[:cut]
        keep = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(buffer)), keep, -1):
                if buffer.endswith(stop[:size]):
                    keep = size
                    break
        self.pending = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep]

    def flush(self) -> str:
        rest, self.pending = self.pending, ""
        return rest


# Content block kinds whose text reaches the client, and where a block keeps its text. A tool
# call's text is its input as JSON: "tool_use" is a call of a client's tool, "structured" the
# CLI's StructuredOutput call, "withheld" the text of an answer that must be JSON (shown at
# the end only if it is that JSON: AnswerFold._finish_json), "hidden" any other block the client
# is not shown.
BLOCK_TEXT = {"text": "text", "thinking": "thinking", "tool_use": "input"}
DELTA_KINDS = {"text_delta": ("text", "text"), "thinking_delta": ("thinking", "thinking"),
               "input_json_delta": ("tool_use", "partial_json")}


def input_text(streamed: str, value: Any) -> str:
    """A finished tool call's input as text: what streamed when it is that input (so a
    collected answer and a stream say the same), else the input as JSON."""
    try:
        if streamed and json.loads(streamed) == value:
            return streamed
    except (ValueError, RecursionError):
        pass
    return json.dumps(value, ensure_ascii=False)


def add_usage(total: Dict[str, Any], usage: Dict[str, Any]) -> None:
    """Add one message's token counts to `total` (whole numbers only)."""
    for key, value in usage.items():
        if isinstance(value, int) and not isinstance(value, bool):
            total[key] = total.get(key, 0) + value


class Pieces:
    """Text that grows by small pieces: appending costs nothing, the text is joined when read
    (a long answer comes in tens of thousands of deltas)."""

    __slots__ = ("parts", "length")

    def __init__(self, text: str = ""):
        self.parts = [text] if text else []
        self.length = len(text)

    def append(self, piece: str) -> None:
        self.parts.append(piece)
        self.length += len(piece)

    def text(self) -> str:
        if len(self.parts) > 1:
            self.parts = ["".join(self.parts)]
        return self.parts[0] if self.parts else ""


class Shown(NamedTuple):
    """A block of the answer as the client has been given it so far (Ledger.sent)."""
    kind: str  # see BLOCK_TEXT
    pieces: Pieces


class Settled(NamedTuple):
    """A block of the answer as the CLI settled it (Ledger.answer)."""
    kind: str
    text: str
    call: Optional[ToolCall]  # a tool_use block's call, as the client knows it


class Message:
    """One API message as the CLI prints it: streamed (message_start, blocks of deltas, the
    whole block as an `assistant` line, message_delta) or printed whole as one `assistant`."""

    def __init__(self, message_id: Optional[str], base: int, usage: Dict[str, Any],
                 new_paragraph: bool):
        self.id = message_id
        self.base = base  # the answer block its block 0 stands for
        self.usage = dict(usage)
        self.new_paragraph = new_paragraph  # its first text starts a paragraph: "\n\n" first
        self.blocks: List[Tuple[str, Pieces]] = []  # (kind, text)
        self.calls: Dict[int, ToolCall] = {}  # its tool_use blocks' calls
        self.caught_up: "set[int]" = set()  # blocks the client has exactly as they are now
        self.stop_reason: Optional[str] = None
        self.diverged = False  # its deltas contradict what was sent: settled when it ends

    def block(self, index: int, kind: str) -> None:
        while len(self.blocks) <= index:
            self.blocks.append((kind, Pieces()))
        if self.blocks[index][0] != kind:
            self.blocks[index] = (kind, self.blocks[index][1])

    def whole_block(self, index: int, block: Dict[str, Any]) -> None:
        """Block `index` as the CLI printed it whole (an `assistant` line): its text stands,
        to be compared with what was sent when the message settles."""
        kind, pieces = self.blocks[index]
        key = BLOCK_TEXT.get(str(block.get("type")))
        if kind in ("tool_use", "structured"):
            text: Optional[str] = input_text(pieces.text(), block.get("input") or {})
        else:
            text = block.get(key) if key else None
        if isinstance(text, str):
            self.blocks[index] = (kind, Pieces(text))
            self.caught_up.discard(index)

    def projected(self, index: int) -> str:
        """Block `index` as the client sees it (a paragraph break before a later message)."""
        kind, pieces = self.blocks[index]
        text = pieces.text()
        first_text = next((i for i, (k, _) in enumerate(self.blocks) if k == "text"), None)
        if text and self.new_paragraph and index == first_text:
            return "\n\n" + text
        return text


class Outbox:
    """What comes out of the fold: the completion events of one CLI line, Start once and
    Finish once and last, the answer's text through the client's stop sequences."""

    def __init__(self, stop: Iterable[str]):
        self.stop = tuple(stop)
        self.stops = StopSequences(self.stop)
        self.events: List[Event] = []
        self.begun = False  # Start was given
        self.finished = False  # Finish was given

    def take(self) -> List[Event]:
        events, self.events = self.events, []
        return events

    def begin(self, model: str, usage: Dict[str, Any]) -> None:
        if not self.begun:
            self.begun = True
            self.events.append(Start(model, dict(usage)))

    def text(self, text: str) -> None:
        safe = self.stops.feed(text)
        if safe:
            self.events.append(Text(safe))

    def thinking(self, text: str) -> None:
        if text:
            self.events.append(Thinking(text))

    def call(self, call: ToolCall) -> None:
        self.events.append(call)

    def tool_input(self, text: str) -> None:
        if text:
            self.events.append(ToolInput(text))

    def revise(self, answer: List[Settled]) -> None:
        """What was sent is replaced by `answer`, through new stop sequence checks."""
        self.stops = StopSequences(self.stop)
        blocks: List[Tuple[str, str]] = []
        calls: List[Tuple[int, ToolCall]] = []
        for kind, text, call in answer:
            if kind in BLOCK_TEXT:
                if call is not None:
                    calls.append((len(blocks), call))
                blocks.append((kind, self.stops.feed(text) if kind == "text" else text))
            if self.stops.hit:
                break
        self.events.append(Revised(tuple(blocks), tuple(calls)))

    def finish(self, reason: Optional[str], usage: Dict[str, Any],
               cut_short: bool = False) -> None:
        rest = self.stops.flush()  # text held back in case it began a stop sequence
        if rest:
            self.events.append(Text(rest))
        self.events.append(Finish("stop_sequence" if self.stops.hit else reason, usage,
                                  cut_short, self.stops.matched))
        self.finished = True


class Ledger:
    """What the client was given of each block of the answer (`sent`), beside the blocks as
    the CLI settled them (`answer`). Each message is laid over `sent` from its `base`: what it
    holds beyond what was sent goes out (to the Outbox), and a message that contradicts what
    was sent revises it when it settles. The usage is that of the settled messages."""

    def __init__(self, outbox: Outbox):
        self.outbox = outbox
        self.sent: List[Shown] = []
        self.answer: List[Settled] = []
        self.calls: Dict[int, ToolCall] = {}  # the call of each tool_use block of `sent`
        self.announced: "set[int]" = set()  # the blocks whose ToolCall went out
        self.abandoned: Optional[Tuple[int, int]] = None  # (base, blocks kept) of the last one
        self.usage: Dict[str, Any] = {}
        self.settled_any = False
        self.last_stop: Optional[str] = None  # the last settled message's stop_reason

    def new_message(self, message_id: Optional[str], usage: Dict[str, Any]) -> Message:
        # Laid over an attempt that broke, as it too began where the settled answer ends.
        wrote = any(block.kind == "text" and block.text for block in self.answer)
        return Message(message_id, len(self.answer), usage,
                       wrote and self.last_stop != "max_tokens")  # a resumed answer joins

    def abandon(self, message: Message, kept: int) -> None:
        """`message` ended without settling (its stream broke), keeping its first `kept`
        blocks (the CLI's `abandoned_blocks`)."""
        self.abandoned = (message.base, kept)

    def called(self, before: Optional[int] = None) -> bool:
        """Whether the settled answer (its blocks before `before`) holds a call."""
        return any(block.kind == "tool_use" for block in self.answer[:before])

    def open(self, message: Message, index: Any, kind: str) -> None:
        """Block `index` of `message` begins, of `kind` for the client (see BLOCK_TEXT)."""
        if not isinstance(index, int) or index < 0:
            return
        if index == 0 and self.abandoned and self.abandoned[1] and message.base == \
                self.abandoned[0] and not self._fits(message.base, kind):
            message.base += self.abandoned[1]  # resumes after the blocks the CLI kept
        message.block(index, kind)
        position = message.base + index
        if position == len(self.sent):
            self.sent.append(Shown(kind, Pieces()))
            self._place_call(message, index)
        elif not self._fits(position, kind):
            message.diverged = True

    def add(self, message: Message, index: int, kind: str, piece: str) -> None:
        """A delta of block `index`: sent on at once when the client has the block as it was
        (the usual case), else what the block now holds beyond what was sent."""
        message.blocks[index][1].append(piece)
        if message.diverged:
            return
        if index in message.caught_up:
            self.sent[message.base + index].pieces.append(piece)
            self._emit(kind, piece, message.base + index)
        else:
            self.relay(message, index)

    def relay(self, message: Message, index: int) -> None:
        """Send what block `index` holds beyond what was sent; a block that contradicts what
        was sent marks the message diverged (it is then settled or revised when it ends)."""
        kind = message.blocks[index][0]
        text = message.projected(index)
        position = message.base + index
        while len(self.sent) <= position:
            self.sent.append(Shown(kind, Pieces()))
        sent_kind, sent = self.sent[position].kind, self.sent[position].pieces.text()
        if sent_kind != kind and not sent:
            self.sent[position] = Shown(kind, Pieces())
        elif sent_kind != kind or not self._same_call(message, index):
            message.diverged = True
            return
        self._place_call(message, index)
        if text.startswith(sent):
            if len(text) > len(sent):
                self.sent[position] = Shown(kind, Pieces(text))
                self._emit(kind, text[len(sent):], position)
            message.caught_up.add(index)
        elif not sent.startswith(text):  # else a restarted attempt, still repeating
            message.diverged = True

    def settle(self, message: Message) -> None:
        """The message is final: send what it holds beyond what was sent (up to a stop
        sequence), or revise what was sent."""
        ends = message.base + len(message.blocks)
        consistent = not message.diverged and all(
            self._fits(message.base + i, kind) and self._same_call(message, i)
            and message.projected(i).startswith(self.sent[message.base + i].pieces.text())
            for i, (kind, _) in enumerate(message.blocks) if message.base + i < len(self.sent))
        consistent = consistent and not any(shown.pieces.length for shown in self.sent[ends:])
        self.answer[message.base:] = [
            Settled(kind, message.projected(i), self.calls.get(
                message.base + i, message.calls.get(i)) if kind == "tool_use" else None)
            for i, (kind, _) in enumerate(message.blocks)]
        add_usage(self.usage, message.usage)
        self.settled_any, self.last_stop, self.abandoned = True, message.stop_reason, None
        if not consistent:
            self._revise()
            return
        del self.sent[ends:]
        for index in range(len(message.blocks)):
            self.relay(message, index)
            if self.outbox.stops.hit:
                return

    def _revise(self) -> None:
        self.outbox.revise(self.answer)
        self.sent = [Shown(block.kind, Pieces(block.text)) for block in self.answer]
        self.calls = {i: block.call for i, block in enumerate(self.answer)
                      if block.call is not None}
        self.announced = set(self.calls)

    def _place_call(self, message: Message, index: int) -> None:
        """Block `index` of `message` stands where nothing was sent: its call stands there."""
        position = message.base + index
        if index in message.calls and position not in self.announced:
            self.calls[position] = message.calls[index]

    def _fits(self, position: int, kind: str) -> bool:
        """Whether a block of `kind` can stand at `position` of what was sent."""
        return position >= len(self.sent) or self.sent[position].kind == kind \
            or not self.sent[position].pieces.length

    def _same_call(self, message: Message, index: int) -> bool:
        """Whether block `index` calls the same tool as the call sent where it stands."""
        sent = self.calls.get(message.base + index)
        call = message.calls.get(index)
        return sent is None or call is None or sent.name == call.name

    def _emit(self, kind: str, text: str, position: int) -> None:
        """More of block `position` goes out; a call goes out before its first input."""
        if kind == "tool_use":
            if position not in self.announced:
                if position not in self.calls:
                    return
                self.announced.add(position)
                self.outbox.call(self.calls[position])
            self.outbox.tool_input(text)
        elif kind == "thinking":
            self.outbox.thinking(text)
        elif kind == "text":
            self.outbox.text(text)


class AnswerFold:
    """The CLI's stream-json events folded into completion events (see completion_events).

    It reads in three steps: `feed` reads each CLI line into the Message it belongs to
    (message_start, deltas, whole blocks, message_delta, the result), the Ledger lays each
    message over what the client was given and says what is new, and the Outbox makes that
    completion events, through the stop sequences.

    The CLI may stream one turn more than once: when the API connection drops mid-answer it
    ends that message with `abandoned_blocks` (and no message_delta), then streams the turn
    again after `system/api_retry`, or fetches it whole and prints one `assistant` message, or,
    when finished blocks (thinking) survived, asks the model to resume with a synthetic user
    line (shared/claude-cli/p-midstream-cut-*, and EndToEndTest). A message that follows an
    abandoned one is laid over it: its deltas are relayed only past what was sent, a settled
    message that holds more gives the rest, and one that contradicts what was sent yields
    Revised. The usage is that of the settled messages, not of the attempts that failed.
    """

    def __init__(self, stop: Iterable[str] = (), max_tokens_ends: bool = False,
                 now: Optional[float] = None, tools: Mapping[str, Tool] = {},
                 schema: Optional[Dict[str, Any]] = None, single_call: bool = False):
        """`tools`: the client's tools by the name the model sees; `schema`: the answer is JSON
        of it, the CLI's structured output or a text answer that is such JSON (other text is not
        shown); `single_call`: at most one call."""
        self.tools = dict(tools)
        self.output_schema = schema
        self.schema = schema is not None
        self.single_call = single_call
        self.max_tokens_ends = max_tokens_ends
        self.now = now
        self.model: Optional[str] = None
        self.rate_limit: Optional[Dict[str, Any]] = None
        self.streaming: Optional[Message] = None  # between message_start and its end
        self.whole: Optional[Message] = None  # printed whole; settled at the next other line
        self.outbox = Outbox(stop)
        self.ledger = Ledger(self.outbox)

    @property
    def finished(self) -> bool:
        return self.outbox.finished

    def feed(self, event: Dict[str, Any]) -> List[Event]:
        """The completion events that one CLI line gives; raises APIError for an error result."""
        kind = event.get("type")
        message = event.get("message")
        message = message if isinstance(message, dict) else {}
        if self.whole and not (kind == "assistant" and message.get("id") == self.whole.id):
            self._settle(self.whole)
            self.whole = None
        if self.finished:
            return self.outbox.take()
        if kind == "system" and event.get("subtype") == "init":
            self.model = self.model or event.get("model")
        elif kind == "rate_limit_event":
            self.rate_limit = event.get("rate_limit_info")
        elif event.get("parent_tool_use_id") is not None:
            pass  # a subagent's line
        elif kind == "stream_event":
            self._stream_event(event.get("event") or {}, event)
        elif kind == "assistant" and not event.get("is_api_error_message"):
            self._assistant(message)
        elif kind == "result":
            self._result(event)
        return self.outbox.take()

    def _stream_event(self, inner: Dict[str, Any], line: Dict[str, Any]) -> None:
        kind = inner.get("type")
        message = self.streaming
        if kind == "message_start":
            start = inner.get("message") or {}
            self.model = start.get("model") or self.model
            self._abandon()
            self.streaming = self.ledger.new_message(start.get("id"), start.get("usage") or {})
            self.outbox.begin(self.model or "claude", self.streaming.usage)
        elif message is None:
            return
        elif kind == "content_block_start":
            self._open_block(message, inner.get("index"), inner.get("content_block") or {})
        elif kind == "content_block_delta":
            self._delta(message, inner.get("index"), inner.get("delta") or {})
        elif kind == "message_delta":
            message.stop_reason = (inner.get("delta") or {}).get("stop_reason")
            message.usage.update(inner.get("usage") or {})
            self.streaming = None
            self._settle(message)
            if self.finished:
                return
            if message.stop_reason == "max_tokens" and self.max_tokens_ends:
                self._finish("max_tokens", cut_short=True)
            elif message.stop_reason == "tool_use" and self.ledger.called():
                # The model's turn is over and every call in it arrived: hand them back.
                self._finish("tool_use", cut_short=True)
        elif kind == "message_stop":
            abandoned = line.get("abandoned_blocks")
            kept = abandoned.get("from_block_index") if isinstance(abandoned, dict) else 0
            self._abandon(kept if isinstance(kept, int) and kept > 0 else 0)

    def _delta(self, message: Message, index: Any, delta: Dict[str, Any]) -> None:
        if delta.get("type") not in DELTA_KINDS:
            return  # signatures
        kind, key = DELTA_KINDS[delta["type"]]
        if not isinstance(index, int) or index < 0 or not isinstance(delta.get(key), str):
            return
        known = message.blocks[index][0] if index < len(message.blocks) else None
        if known in ("hidden", "structured", "withheld") or kind == "text" and self.schema:
            return  # not shown (a structured answer is its result's)
        if kind == "tool_use" and known != "tool_use":
            return  # the input of a call that never began
        if known != kind:
            self.ledger.open(message, index, kind)
        self.ledger.add(message, index, kind, delta[key])
        self._cut_at_stop()

    def _assistant(self, message: Dict[str, Any]) -> None:
        content = [b for b in message.get("content") or [] if isinstance(b, dict)]
        streaming = self.streaming
        if streaming is not None and message.get("id") == streaming.id:
            # One line per finished block, just before its content_block_stop: the block whole.
            if len(content) == 1 and streaming.blocks:
                streaming.whole_block(len(streaming.blocks) - 1, content[0])
            return
        self._abandon()
        if self.whole is None:  # a message fetched without streaming, after a broken stream
            self.whole = self.ledger.new_message(message.get("id"), message.get("usage") or {})
            self.whole.stop_reason = message.get("stop_reason")
            self.outbox.begin(self.model or "claude", self.whole.usage)
        for block in content:
            index = len(self.whole.blocks)
            self._open_block(self.whole, index, block)
            self.whole.whole_block(index, block)

    def _result(self, result: Dict[str, Any]) -> None:
        self._abandon()
        ledger, subtype = self.ledger, result.get("subtype")
        if self.outbox.begun and result.get("api_error") == "max_output_tokens":
            # The CLI resumed at the output limit three times and gave up: the text stands.
            self._finish("max_tokens")
            return
        if ledger.called() and subtype in ("success", "error_max_turns"):
            self._finish("tool_use")  # calls that came whole: --max-turns 1 ended the run
            return
        if subtype == "error_max_turns" and self.schema:  # tools offered too: one turn
            self._finish_json(result)
            return
        if subtype == "error_max_turns" and ledger.settled_any:
            self._finish(ledger.last_stop)  # the model called a tool it does not have
            return
        if result.get("is_error") or subtype != "success":
            raise error_from_result(result, self.rate_limit, self.now)
        if not ledger.settled_any:  # no partial messages came: answer from the result alone
            self.outbox.begin(self.model or "claude", {})
            ledger.usage = dict(result.get("usage") or {})
            if not self.schema:
                self.outbox.text(result.get("result") or "")
        if self.schema:
            self._finish_json(result)
            return
        self._finish(result.get("stop_reason") or ledger.last_stop)

    def _finish_json(self, result: Dict[str, Any]) -> None:
        """The answer of a request for JSON: the CLI's structured output, or else the first
        text the model wrote that is such JSON (models often answer in plain text, fenced or
        not, and the API would return that): the result's, then the turns' from the last."""
        said = result.get("result")
        said = said if isinstance(said, str) else ""
        value = result.get("structured_output")
        if value is not None:
            self.outbox.text(input_text(said, value))
        else:
            texts = [said] + [block.text for block in reversed(self.ledger.answer)
                              if block.kind == "withheld"]
            for text in texts:
                found = json_in_text(text)
                if found is not None and schema_error(found[0], self.output_schema or {}) is None:
                    self.outbox.text(found[1])
                    break
            else:
                raise no_structured_output()
        self._finish("end_turn")

    def _open_block(self, message: Message, index: Any, block: Dict[str, Any]) -> None:
        """A content block begins: of which kind it is for the client (see BLOCK_TEXT)."""
        kind = str(block.get("type"))
        if kind == "text" and self.schema:
            kind = "withheld"  # the answer is JSON: the structured output, or this if it is
        elif kind == "tool_use":
            tool = self.tools.get(str(block.get("name")))
            earlier = self.ledger.called(message.base) or any(
                k == "tool_use" for k, _ in message.blocks[:index if isinstance(index, int)
                                                            else None])
            if block.get("name") == STRUCTURED_OUTPUT_TOOL and self.schema:
                kind = "structured"
            elif tool is None or (self.single_call and earlier):
                kind = "hidden"  # not a client's tool, or a call beyond the one allowed
            elif isinstance(index, int):
                message.calls[index] = ToolCall(str(block.get("id") or "toolu_" +
                                                    uuid.uuid4().hex[:24]),
                                                tool.name, tool.namespace, tool.custom)
        self.ledger.open(message, index, kind)

    def _abandon(self, kept: int = 0) -> None:
        """The message being streamed ended without settling (its stream broke)."""
        message, self.streaming = self.streaming, None
        if message is not None:
            self.ledger.abandon(message, kept)

    def _settle(self, message: Message) -> None:
        self.ledger.settle(message)
        self._cut_at_stop()

    def _cut_at_stop(self) -> None:
        if self.outbox.stops.hit and not self.outbox.finished:
            self._finish("stop_sequence", cut_short=True)

    def _finish(self, reason: Optional[str], cut_short: bool = False) -> None:
        usage = dict(self.ledger.usage)
        if self.streaming is not None:  # cut short mid-message
            add_usage(usage, self.streaming.usage)
        self.outbox.finish(reason, usage, cut_short)


FENCED_JSON = re.compile(r"\A\s*```(?:json)?[ \t]*\n(.*?)\n?```\s*\Z", re.S | re.I)


def json_in_text(text: str) -> Optional[Tuple[Any, str]]:
    """(the value, its JSON text) when `text` is one JSON value, bare or in a ``` fence."""
    fenced = FENCED_JSON.match(text)
    text = (fenced.group(1) if fenced else text).strip()
    if not text[:1] in ("{", "["):
        return None
    try:
        return json.loads(text, parse_constant=_reject_constant), text
    except (ValueError, RecursionError):
        return None


def json_types(value: Any) -> "set[str]":
    """The JSON Schema types `value` is of (1.0 is an integer and a number, True only a bool)."""
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, int) or isinstance(value, float) and value.is_integer():
        return {"integer", "number"}
    names = {float: "number", str: "string", list: "array", dict: "object", type(None): "null"}
    return {names[type(value)]} if type(value) in names else set()


def schema_error(value: Any, schema: Any, where: str = "$",
                 root: Optional[Dict[str, Any]] = None) -> Optional[str]:
    """Where `value` breaks `schema`, or None. JSON Schema's common words (what OpenAI's
    structured outputs and pydantic use): type, enum, const, properties, required,
    additionalProperties, items, prefixItems, anyOf, oneOf, allOf, $ref within the document,
    the bounds of strings, numbers and arrays. Others (format, pattern...) are not checked."""
    root = schema if root is None else root
    if not isinstance(schema, dict):
        return None
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            target = target.get(part) if isinstance(target, dict) else None
        if target is not None and target is not schema:
            error = schema_error(value, target, where, root)
            if error:
                return error
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds if isinstance(kinds, list) else None
    if kinds is not None and not json_types(value) & set(map(str, kinds)):
        return "%s is not of type %s" % (where, " or ".join(map(str, kinds)))
    if "enum" in schema and isinstance(schema["enum"], list) and value not in schema["enum"]:
        return "%s is not one of the values allowed" % where
    if "const" in schema and value != schema["const"]:
        return "%s is not the value required" % where
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    for word, holds in (("minimum", operator.ge), ("maximum", operator.le),
                        ("exclusiveMinimum", operator.gt), ("exclusiveMaximum", operator.lt)):
        bound = schema.get(word)
        if number and isinstance(bound, (int, float)) and not holds(value, bound):
            return "%s is out of range (%s %s)" % (where, word, bound)
    for word, kind, holds in (("minLength", str, operator.ge), ("maxLength", str, operator.le),
                              ("minItems", list, operator.ge), ("maxItems", list, operator.le)):
        bound = schema.get(word)
        if isinstance(bound, int) and isinstance(value, kind) and not holds(len(value), bound):
            return "%s has the wrong length (%s %d)" % (where, word, bound)
    for word in ("allOf", "anyOf", "oneOf"):
        options = schema.get(word)
        if isinstance(options, list) and options:
            errors = [schema_error(value, option, where, root) for option in options]
            passed = sum(error is None for error in errors)
            if (word == "allOf" and passed < len(options)) or (word == "anyOf" and not passed) \
                    or (word == "oneOf" and passed != 1):
                return next((e for e in errors if e), "%s matches none of %s" % (where, word))
    if isinstance(value, dict):
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        required = schema.get("required")
        for name in required if isinstance(required, list) else ():
            if name not in value:
                return "%s lacks the property %r" % (where, name)
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in properties:
                error = schema_error(item, properties[name], "%s.%s" % (where, name), root)
            elif extra is False:
                error = "%s has a property that is not allowed: %r" % (where, name)
            else:
                error = schema_error(item, extra, "%s.%s" % (where, name), root)
            if error:
                return error
    if isinstance(value, list):
        first = schema.get("prefixItems")
        first = first if isinstance(first, list) else []
        for index, item in enumerate(value):
            error = schema_error(item, first[index] if index < len(first) else
                                 schema.get("items"), "%s[%d]" % (where, index), root)
            if error:
                return error
    return None


def no_structured_output() -> APIError:
    return APIError(502, "The model did not answer in the requested JSON format: Claude Code "
                    "gave no structured output. Ask again.", type="server_error",
                    code="invalid_structured_output")


def completion_events(cli_events: Iterable[Dict[str, Any]], stop: Iterable[str] = (),
                      max_tokens_ends: bool = False, now: Optional[float] = None,
                      tools: Mapping[str, Tool] = {},
                      schema: Optional[Dict[str, Any]] = None,
                      single_call: bool = False) -> Iterator[Event]:
    """Fold the CLI's stream-json events into Start, Text, Thinking, ToolCall and ToolInput
    pieces, and one Finish (a Revised among them when a retried answer contradicts what was
    sent: see AnswerFold).

    `tools` are the client's, by the name the model sees (Launch.model_tools()):
    a call of one is a ToolCall and its input, and the end of the model's turn that made calls
    ends the answer with stop_reason tool_use, every call of the turn in it (the CLI would
    deny them and ask the model again). With `single_call` only the first call is kept. With
    `schema` (a JSON schema) the answer is the result's `structured_output` as one Text, or,
    when the model wrote its JSON as text instead of through the CLI's tool, that text if it is
    JSON of the schema (other text is not shown); no JSON at all is a 502.

    When a message stops at its output limit, the CLI asks the model to go on ("Output token
    limit hit. Resume directly...") up to three times, then gives up with an error result
    (api_error "max_output_tokens"). With `max_tokens_ends` (the client set max_tokens) the first
    such stop is the end, as in OpenAI's API; otherwise the continuations are joined
    seamlessly, and a CLI that gives up still answers, with the text so far and reason length.

    Raises APIError for other results with `is_error`, and CLIEndedWithoutResult when the stream
    ends with no result. Key order and line order are never relied on; unknown events are skipped.
    """
    fold = AnswerFold(stop, max_tokens_ends, now, tools, schema, single_call)
    for event in cli_events:
        yield from fold.feed(event)
        if fold.finished:
            return
    raise CLIEndedWithoutResult()


def retry_after_seconds(text: str, rate_limit: Optional[Dict[str, Any]],
                        now: float) -> Optional[int]:
    """Seconds until a usage limit resets, when the CLI says when."""
    resets = (rate_limit or {}).get("resetsAt")
    if not isinstance(resets, (int, float)) or isinstance(resets, bool):
        # Older CLIs print "Claude AI usage limit reached|<unix time>".
        match = re.search(r"\|(\d{9,11})\b", text)
        resets = int(match.group(1)) if match else None
    if resets is None:
        return None
    return max(1, int(resets - now))


# The API's refusal of a subscription request that only extra usage could pay for, by meaning:
# "Third-party apps now draw from your extra usage, not your plan limits. ...", "Extra usage
# is required for long context requests." (their wording changes).
EXTRA_USAGE_REQUIRED = re.compile(r"\bextra usage\b", re.I)


def error_from_result(result: Dict[str, Any], rate_limit: Optional[Dict[str, Any]] = None,
                      now: Optional[float] = None) -> APIError:
    """A CLI `result` with is_error as the HTTP error a client should see."""
    errors = result.get("errors")
    text = result.get("result")
    if not isinstance(text, str) or not text:
        text = "; ".join(str(e) for e in errors) if isinstance(errors, list) and errors else ""
    text = text or "Claude Code ended with an error (%s)." % result.get("subtype")
    status = result.get("api_error_status")
    status = status if isinstance(status, int) and not isinstance(status, bool) else None
    lowered = text.lower()
    said = " Claude Code said: " + text
    # The HTTP status decides when the CLI gives one; the text only when it does not.
    limit_text = re.search(r"rate limit|usage limit|hit your limit", lowered) is not None
    auth_text = re.search(r"not logged in|/login|invalid api key", lowered) is not None
    if status == 401 or (status is None and auth_text and not limit_text):
        return APIError(401, "Claude Code is not logged in or its credentials were refused: run "
                        "`claude` in a terminal and log in." + said,
                        type="authentication_error", code="claude_not_logged_in")
    if status in (400, 403) and EXTRA_USAGE_REQUIRED.search(text):
        return APIError(400, "Your Claude subscription would not count this request against "
                        "your plan's limits: it can only run on extra usage (paid per use), "
                        "which your account does not allow. The API said: %s To go on, turn on "
                        "extra usage in your claude.ai settings (Settings > Usage); for a long "
                        "context, send a shorter input or use a model without [1m]."
                        % re.sub(r"^API Error: \d+\s*", "", text.strip()),
                        code="extra_usage_required")
    if result.get("terminal_reason") == "prompt_too_long" or "prompt is too long" in lowered:
        return APIError(400, "The conversation is too long for the model's context window." + said,
                        code="context_length_exceeded", param="messages")
    limited = (rate_limit or {}).get("status") == "rejected"
    if status == 429 or limited or (status is None and limit_text):
        return APIError(429, "Your Claude subscription's rate or usage limit was reached." + said,
                        type="rate_limit_error", code="rate_limit_exceeded",
                        retry_after=retry_after_seconds(
                            text, rate_limit, time.time() if now is None else now))
    if status == 529 or "overloaded" in lowered:
        return APIError(503, "The Anthropic API is overloaded; try again shortly." + said,
                        type="server_error", code="overloaded")
    if status == 404:
        return APIError(404, text, code="model_not_found", param="model")
    if status == 403:
        return APIError(403, text, type="permission_error", code="permission_denied")
    if status in (400, 413, 422):
        return APIError(400, text)
    if status is not None and status >= 500:
        return APIError(502, "The Anthropic API failed (HTTP %d)." % status + said,
                        type="server_error", code="upstream_error")
    return APIError(502, "Claude Code failed." + said, type="server_error", code="claude_error")


##############################################################################
# Dialects: each API's parsing, Answer and Dialect, and the registry (pure functions)
##############################################################################

def sse(data: Any, event: Optional[str] = None) -> bytes:
    """One server-sent event; `event` names it (Anthropic and Responses do, Chat does not)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return ("%sdata: %s\n\n" % ("event: %s\n" % event if event else "", text)).encode("utf-8")


def answer_changed() -> APIError:
    return APIError(
        502, "The Anthropic API stream broke mid-answer and Claude Code's retry answered "
        "differently from the text already streamed, so that text is not the answer. Ask again "
        "(or ask without streaming, which always gets the final answer).", type="server_error",
        code="answer_changed")


class Answer:
    """One answer in a dialect, built from completion events: feed() gives the bytes to
    stream for each event, body() the whole answer once Finish was fed. When not `streaming`,
    a Revised event replaces what was built; a stream cannot take it back (answer_changed)."""

    def __init__(self, request: Request, answer_id: str, streaming: bool):
        self.request = request
        self.id = answer_id
        self.created = int(time.time())
        self.streaming = streaming
        self.model = request.model
        # (kind, text): text, thinking and tool_use blocks (a call's text: its input as JSON)
        self.blocks: List[Tuple[str, Pieces]] = []
        self.calls: Dict[int, ToolCall] = {}  # the call of each tool_use block
        self.finish = Finish(None, {})

    def feed(self, event: Event) -> bytes:
        if isinstance(event, Start):
            self.model = event.model
            return self.on_start(event)
        if isinstance(event, (Text, Thinking, ToolCall, ToolInput)):
            kind = "text" if isinstance(event, Text) else "thinking" if isinstance(
                event, Thinking) else "tool_use"
            out = b""
            if isinstance(event, ToolCall) or not self.blocks or self.blocks[-1][0] != kind:
                if kind == "tool_use" and not isinstance(event, ToolCall):
                    return b""  # input with no call before it: nothing to add it to
                out += self.block_ends() if self.blocks else b""
                self.blocks.append((kind, Pieces()))
                if isinstance(event, ToolCall):
                    self.calls[len(self.blocks) - 1] = event
                out += self.block_starts(kind)
            if isinstance(event, ToolCall):
                return out if self.streaming else b""
            self.blocks[-1][1].append(event.text)
            if not self.streaming:
                return b""  # a collected answer needs no bytes for its deltas
            return out + self.delta(kind, event.text)
        if isinstance(event, Revised):
            if self.streaming:
                raise answer_changed()
            kept = [(i, kind, text) for i, (kind, text) in enumerate(event.blocks)
                    if text or kind == "tool_use"]
            calls = dict(event.calls)
            self.blocks = [(kind, Pieces(text)) for _, kind, text in kept]
            self.calls = {n: calls[i] for n, (i, _, _) in enumerate(kept) if i in calls}
            return b""
        self.finish = event
        return (self.block_ends() if self.blocks else b"") + self.finished()

    def text(self, kind: str = "text") -> str:
        return "".join(text.text() for k, text in self.blocks if k == kind)

    def tool_calls(self) -> List[Tuple[int, ToolCall, str]]:
        """(block index, call, its input as JSON text) of each tool call, in order."""
        return [(i, call, self.blocks[i][1].text() or "{}") for i, call in
                sorted(self.calls.items())]

    @staticmethod
    def custom_input(arguments: str) -> str:
        """A freeform tool's input: the string its one parameter holds."""
        try:
            value = json.loads(arguments)
        except (ValueError, RecursionError):
            return arguments
        if isinstance(value, dict) and isinstance(value.get("input"), str):
            return str(value["input"])
        return arguments

    def call_block(self, index: int, key: bool = False) -> Block:
        """Tool call block `index` as an Anthropic tool_use block; `key`: named by Tool.key."""
        call = self.calls[index]
        try:
            value = json.loads(self.blocks[index][1].text() or "{}")
        except (ValueError, RecursionError):
            value = None
        name = "%s__%s" % (call.namespace, call.name) if key and call.namespace else call.name
        return {"type": "tool_use", "id": call.id, "name": name,
                "input": value if isinstance(value, dict) else {}}

    def turn(self) -> Turn:
        """The answer as the assistant turn of a conversation (what Responses stores)."""
        blocks: List[Block] = [{"type": "text", "text": self.text()}] if self.text() else []
        return "assistant", blocks + [self.call_block(i, key=True) for i in sorted(self.calls)]

    def block_text(self, index: int) -> Tuple[str, str]:
        kind, text = self.blocks[index]
        return kind, text.text()

    # Each dialect's own: its events for these moments, its whole body, its errors.
    def on_start(self, start: Start) -> bytes:
        return b""

    def block_starts(self, kind: str) -> bytes:
        return b""

    def delta(self, kind: str, text: str) -> bytes:
        return b""

    def block_ends(self) -> bytes:
        return b""

    def finished(self) -> bytes:
        return b""

    def body(self) -> Dict[str, Any]:
        raise NotImplementedError

    def stream_error(self, error: APIError) -> bytes:
        raise NotImplementedError


class Dialect:
    """An API dialect: where it is served, how a body becomes a Request, its Answer, and its
    error shape. Each subclass has these members, in this order."""
    path = ""  # under /v1
    name = ""
    id_prefix = ""  # of its answers' ids
    answer_class = Answer

    def parse(self, body: Any) -> Request:
        raise NotImplementedError

    def answer(self, request: Request, answer_id: str, streaming: bool) -> Answer:
        return self.answer_class(request, answer_id, streaming)

    def error(self, error: APIError) -> Tuple[int, Dict[str, Any]]:
        """(status, body) of an error in this dialect's shape."""
        return error.status, error.body()


# -- Chat Completions (POST /v1/chat/completions) ---------------------------

def chat_content(content: Any, where: str, images: bool = True) -> List[Block]:
    """A Chat Completions message `content` (string or list of parts) as Anthropic blocks."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if content is None:
        return []
    if not isinstance(content, list):
        raise invalid(where, "`%s` must be a string or a list of content parts." % where)
    blocks = []
    for i, part in enumerate(content):
        at = "%s[%d]" % (where, i)
        if not isinstance(part, dict):
            raise invalid(at, "Each content part must be an object with a `type`.")
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise invalid(at + ".text", "Text parts need a string `text`.")
            blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url" and images:
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise invalid(at + ".image_url", "Image parts need `image_url.url`.")
            blocks.append(image_block(url, at + ".image_url.url"))
        else:
            allowed = "`text` and `image_url`" if images else "`text`"
            raise invalid(at + ".type", "Content part type %r is not supported here; use %s."
                          % (str(kind)[:50], allowed))
    return blocks


def chat_calls(message: Dict[str, Any], where: str, index: int) -> List[Block]:
    """An assistant message's `tool_calls` (or legacy `function_call`) as tool_use blocks."""
    calls = message.get("tool_calls")
    if message.get("function_call") is not None:  # legacy: one call, matched by name
        calls = [{"id": "call_%d" % index, "type": "function",
                  "function": message["function_call"]}]
        where += ".function_call"
    elif not isinstance(calls, list):
        raise invalid(where + ".tool_calls", "`tool_calls` must be a list.")
    else:
        where += ".tool_calls"
    blocks = []
    for i, call in enumerate(calls):
        at = "%s[%d]" % (where, i) if message.get("function_call") is None else where
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(call.get("id"), str) or \
                call.get("type", "function") != "function":
            raise invalid(at, "Each tool call needs an `id` and a `function` with `name` and "
                          "`arguments`.")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise invalid(at + ".function.name", "A tool call needs the function's `name`.")
        blocks.append({"type": "tool_use", "id": call["id"], "name": function["name"],
                       "input": tool_input(function.get("arguments"),
                                           at + ".function.arguments")})
    return blocks


def chat_turns(messages: Any) -> Tuple[Optional[str], List[Turn]]:
    """Chat `messages` -> (system text or None, turns). `system` and `developer` messages
    become appended system instructions; an assistant's tool calls become tool_use blocks and
    `tool` (or legacy `function`) messages tool_result blocks of the user's next turn."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "`messages` must be a non-empty list.")
    system_parts: List[str] = []
    turns: List[Turn] = []
    legacy_calls: Dict[str, List[str]] = {}  # function name -> ids of its unanswered calls
    for i, message in enumerate(messages):
        where = "messages[%d]" % i
        if not isinstance(message, dict):
            raise invalid(where, "Each message must be an object with `role` and `content`.")
        role = message.get("role")
        if role in ("system", "developer"):
            system_parts.append(text_of(chat_content(message.get("content"), where + ".content",
                                                     images=False)))
        elif role == "user":
            if message.get("tool_calls") is not None:
                raise invalid(where + ".tool_calls", "Only assistant messages have tool calls.")
            add_to_turn(turns, "user", chat_content(message.get("content"), where + ".content"))
        elif role == "assistant":
            blocks = chat_content(message.get("content"), where + ".content")
            if message.get("tool_calls") or message.get("function_call") is not None:
                calls = chat_calls(message, where, i)
                if message.get("function_call") is not None:
                    legacy_calls.setdefault(calls[0]["name"], []).append(calls[0]["id"])
                blocks += calls
            add_to_turn(turns, "assistant", blocks)
        elif role == "tool":
            add_to_turn(turns, "user", [tool_result(
                message.get("tool_call_id"), chat_content(message.get("content"),
                                                          where + ".content"),
                where + ".tool_call_id")])
        elif role == "function":
            waiting = legacy_calls.get(str(message.get("name")))
            add_to_turn(turns, "user", [tool_result(
                waiting.pop(0) if waiting else "call_%s" % message.get("name"),
                chat_content(message.get("content"), where + ".content"), where + ".name")])
        else:
            raise invalid(where + ".role", "Unknown role %r; use system, developer, user, "
                          "assistant or tool." % str(role)[:50])
    check_turns(turns, "messages")
    return "\n\n".join(p for p in system_parts if p) or None, turns


def chat_tool_choice(value: Any, field: str, tools: List[Tool]) -> Tuple[str, List[Tool]]:
    """Chat's tool_choice (or legacy function_call) as (choice, the tools it allows)."""
    if value is None:
        return "auto", tools
    if value in ("none", "auto", "required"):
        return str(value), tools
    if isinstance(value, dict):
        if value.get("type") == "allowed_tools" and isinstance(value.get("allowed_tools"), dict):
            allowed = value["allowed_tools"]
            names = {t.get("function", {}).get("name") if isinstance(t, dict) else None
                     for t in allowed.get("tools") or []}
            mode = allowed.get("mode", "auto")
            if mode in ("auto", "required") and None not in names:
                return str(mode), [t for t in tools if t.name in names]
        function = value.get("function", value)  # legacy function_call: {"name": ...}
        if isinstance(function, dict) and isinstance(function.get("name"), str) and \
                value.get("type", "function") == "function":
            return function["name"], tools
    raise invalid(field, "`%s` must be \"none\", \"auto\", \"required\" or name a function."
                  % field)


def chat_tools(body: Dict[str, Any]) -> Tuple[Tuple[Tool, ...], str, bool]:
    """A Chat request's `tools` (or legacy `functions`): (offered tools, choice, parallel)."""
    tools_value = check_type(body, "tools", list, "a list of tools")
    functions = check_type(body, "functions", list, "a list of functions")
    if tools_value and functions:
        raise invalid("functions", "Give `tools` or the older `functions`, not both.")
    field, items = ("functions", functions) if functions else ("tools", tools_value or [])
    tools = []
    for i, item in enumerate(items):
        at = "%s[%d]" % (field, i)
        function = item if field == "functions" else (
            item.get("function") if isinstance(item, dict) else None)
        if field == "tools" and isinstance(item, dict) and item.get("type") != "function":
            raise invalid(at + ".type", "Tool type %r is not supported; use function."
                          % str(item.get("type"))[:50])
        if not isinstance(function, dict):
            raise invalid(at, "Each tool needs a `function` object with a `name`.")
        where = at if field == "functions" else at + ".function"
        tools.append(make_tool(function.get("name"), function.get("description"),
                               tool_schema(function.get("parameters"), where + ".parameters"),
                               where, OPENAI_TOOL_NAME))
    legacy = field == "functions" or (body.get("tool_choice") is None and
                                      body.get("function_call") is not None)
    choice_field = "function_call" if legacy else "tool_choice"
    choice, tools = chat_tool_choice(body.get(choice_field), choice_field, tools)
    parallel = check_type(body, "parallel_tool_calls", bool, "true or false")
    offered, choice = choose_tools(offered_tools(tools, field), choice, choice_field)
    # The older API returns at most one function_call.
    return offered, choice, parallel is not False and field == "tools"


def parse_chat_request(body: Any) -> Request:
    """Validate a Chat Completions request; every problem is a 4xx naming the field."""
    if not isinstance(body, dict):
        raise invalid("", "The request body must be a JSON object.")
    model, cli_model = resolve_model(body.get("model"))
    system, turns = chat_turns(body.get("messages"))
    stream = check_type(body, "stream", bool, "true or false")
    options = check_type(body, "stream_options", dict, "an object") or {}
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise invalid("stream_options.include_usage", "`include_usage` must be true or false.")
    max_tokens = optional_int(body, "max_completion_tokens", 1, MAX_TOKENS_LIMIT)
    if max_tokens is None:
        max_tokens = optional_int(body, "max_tokens", 1, MAX_TOKENS_LIMIT)
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise invalid("n", "Only `n: 1` is supported: the CLI gives one answer per request.")
    check_numbers(body, NUMBER_RANGES)
    if body.get("logprobs") not in (None, False):
        raise invalid("logprobs", "`logprobs` are not available through Claude Code.")
    tools, choice, parallel = chat_tools(body)
    return Request(model=model, cli_model=cli_model, system=system, turns=turns,
                   stream=bool(stream), max_tokens=max_tokens,
                   stop=stop_sequences(body.get("stop"), "stop", 4),
                   effort=openai_effort(body.get("reasoning_effort"), "reasoning_effort"),
                   include_usage=include_usage, tools=tools, tool_choice=choice,
                   parallel_tools=parallel,
                   output_schema=output_schema(body.get("response_format"), "response_format"),
                   echo={"functions": bool(body.get("functions"))})


def finish_reason(stop_reason: Optional[str]) -> str:
    return FINISH_REASONS.get(stop_reason or "", "stop")


def count(usage: Dict[str, Any], key: str) -> int:
    value = usage.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def openai_usage(usage: Dict[str, Any]) -> Dict[str, Any]:
    """Anthropic token counts as OpenAI `usage`; cached prompt tokens count as prompt tokens."""
    cached = count(usage, "cache_read_input_tokens")
    prompt = count(usage, "input_tokens") + count(usage, "cache_creation_input_tokens") + cached
    completion = count(usage, "output_tokens")
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class ChatAnswer(Answer):
    """`chat.completion` and its `chat.completion.chunk` stream; thinking as
    `reasoning_content`, the field Open WebUI, LiteLLM and others read."""

    def chunk(self, delta: Dict[str, Any], finish: Optional[str] = None) -> bytes:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                 "model": self.model, "system_fingerprint": None,
                 "choices": [{"index": 0, "delta": delta, "logprobs": None,
                              "finish_reason": finish}]}
        if self.request.include_usage:
            chunk["usage"] = None
        return sse(chunk)

    def on_start(self, start: Start) -> bytes:
        return self.chunk({"role": "assistant", "content": "", "refusal": None})

    def legacy(self) -> bool:
        return bool(self.request.echo.get("functions"))

    def call_delta(self, arguments: str, first: bool) -> Dict[str, Any]:
        """A streamed piece of the last call: its id, type and name come with the first."""
        index = len(self.blocks) - 1
        call = self.calls[index]
        function: Dict[str, Any] = {"name": call.name, "arguments": arguments} if first else {
            "arguments": arguments}
        if self.legacy():
            return {"function_call": function}
        piece: Dict[str, Any] = {"index": sorted(self.calls).index(index)}
        if first:
            piece.update(id=call.id, type="function")
        piece["function"] = function
        return {"tool_calls": [piece]}

    def block_starts(self, kind: str) -> bytes:
        return self.chunk(self.call_delta("", True)) if kind == "tool_use" else b""

    def delta(self, kind: str, text: str) -> bytes:
        if kind == "tool_use":
            return self.chunk(self.call_delta(text, False))
        return self.chunk({"content": text} if kind == "text" else {"reasoning_content": text})

    def finish_reason(self) -> str:
        if self.calls and self.finish.stop_reason == "tool_use":
            return "function_call" if self.legacy() else "tool_calls"
        return finish_reason(self.finish.stop_reason)

    def finished(self) -> bytes:
        out = self.chunk({}, self.finish_reason())
        if self.request.include_usage:
            out += sse({"id": self.id, "object": "chat.completion.chunk",
                        "created": self.created, "model": self.model,
                        "system_fingerprint": None, "choices": [],
                        "usage": openai_usage(self.finish.usage)})
        return out + sse("[DONE]")

    def body(self) -> Dict[str, Any]:
        calls = self.tool_calls()
        message: Dict[str, Any] = {"role": "assistant", "content": self.text() or (
            None if calls else ""), "refusal": None}
        if calls and self.legacy():
            message["function_call"] = {"name": calls[0][1].name, "arguments": calls[0][2]}
        elif calls:
            message["tool_calls"] = [{"id": call.id, "type": "function", "function": {
                "name": call.name, "arguments": arguments}} for _, call, arguments in calls]
        if self.text("thinking"):
            message["reasoning_content"] = self.text("thinking")
        return {
            "id": self.id, "object": "chat.completion", "created": self.created,
            "model": self.model, "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": self.finish_reason()}],
            "usage": openai_usage(self.finish.usage),
        }

    def stream_error(self, error: APIError) -> bytes:
        return sse(error.body())


class ChatCompletions(Dialect):
    path = "/chat/completions"
    name = "OpenAI Chat Completions"
    id_prefix = "chatcmpl-"
    answer_class = ChatAnswer

    def parse(self, body: Any) -> Request:
        return parse_chat_request(body)


# -- Anthropic Messages (POST /v1/messages) -----------------------------------

def anthropic_blocks(content: Any, where: str) -> List[Block]:
    """Messages API content (a string or blocks) as the blocks the CLI passes on."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise invalid(where, "`%s` must be a string or a list of content blocks." % where)
    blocks = []
    for i, block in enumerate(content):
        at = "%s[%d]" % (where, i)
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise invalid(at + ".text", "Text blocks need a string `text`.")
            blocks.append({"type": "text", "text": block["text"]})
        elif kind in ("image", "document"):
            blocks.append(anthropic_source(kind, block.get("source"), at + ".source"))
        elif kind in ("thinking", "redacted_thinking"):
            continue  # the model's own earlier reasoning: not part of the transcript
        elif kind == "tool_use":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise invalid(at, "`tool_use` blocks need an `id` and a `name`.")
            blocks.append({"type": "tool_use", "id": block["id"], "name": block["name"],
                           "input": tool_input(block.get("input", {}), at + ".input")})
        elif kind == "tool_result":
            content = block.get("content", "")
            blocks.append(tool_result(block.get("tool_use_id"), [
                b for b in anthropic_blocks(content, at + ".content")
                if b["type"] not in ("tool_use", "tool_result")], at + ".tool_use_id",
                block.get("is_error") is True))
        elif isinstance(kind, str) and (kind.startswith("server_tool_use") or
                                        kind.endswith("_tool_result")):
            continue  # what a hosted tool did, in another provider's conversation
        else:
            raise invalid(at + ".type", "Content block type %r is not supported; use text, "
                          "image, document, tool_use or tool_result." % str(kind)[:50])
    return blocks


def anthropic_source(kind: str, source: Any, where: str) -> Block:
    if not isinstance(source, dict):
        raise invalid(where, "`%s` blocks need a `source` object." % kind)
    if source.get("type") == "base64":
        return base64_block(kind, source.get("media_type"), source.get("data"), where)
    if source.get("type") == "url" and isinstance(source.get("url"), str) and \
            source["url"].startswith("https://"):
        return {"type": kind, "source": {"type": "url", "url": source["url"]}}
    if kind == "document" and source.get("type") == "text" and \
            isinstance(source.get("data"), str):
        return {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                               "data": source["data"]}}
    raise invalid(where, "Use a base64 or an https url `source`%s."
                  % (" (or text, for documents)" if kind == "document" else ""))


def system_text(value: Any, field: str) -> Optional[str]:
    """A system prompt given as a string or as a list of text blocks."""
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, list) and all(isinstance(b, dict) and b.get("type") == "text" and
                                       isinstance(b.get("text"), str) for b in value):
        return "\n\n".join(b["text"] for b in value if b["text"]) or None
    raise invalid(field, "`%s` must be a string or a list of text blocks." % field)


def thinking_effort(body: Dict[str, Any]) -> Optional[str]:
    """`output_config.effort` (what Claude Code sends) or else `thinking`, as --effort."""
    config = check_type(body, "output_config", dict, "an object") or {}
    effort = config.get("effort")
    if effort is not None:
        if effort not in EFFORTS:
            raise invalid("output_config.effort", "`effort` must be one of %s."
                          % ", ".join(EFFORTS))
        return str(effort)
    thinking = check_type(body, "thinking", dict, "an object")
    if thinking is None or thinking.get("type") == "adaptive":
        return None
    if thinking.get("type") == "disabled":
        return "low"
    budget = thinking.get("budget_tokens")
    if thinking.get("type") != "enabled" or isinstance(budget, bool) or \
            not isinstance(budget, int) or budget < 1:
        raise invalid("thinking", "`thinking` must be {\"type\": \"enabled\", \"budget_tokens\": "
                      "N}, {\"type\": \"disabled\"} or {\"type\": \"adaptive\"}.")
    return next(effort for limit, effort in THINKING_BUDGETS if budget <= limit)


def messages_tools(body: Dict[str, Any]) -> Tuple[Tuple[Tool, ...], str, bool]:
    """A Messages request's `tools` and `tool_choice`: (offered tools, choice, parallel)."""
    tools = []
    for i, item in enumerate(check_type(body, "tools", list, "a list of tools") or []):
        at = "tools[%d]" % i
        if not isinstance(item, dict):
            raise invalid(at, "Each tool must be an object with a `name`.")
        kind = item.get("type")
        if kind not in (None, "custom"):
            if isinstance(kind, str) and HOSTED_TOOL_TYPES.fullmatch(kind):
                leave_out(kind, "Anthropic")
                continue
            raise invalid(at + ".type", "Tool type %r is not supported." % str(kind)[:50])
        tools.append(make_tool(item.get("name"), item.get("description"),
                               tool_schema(item.get("input_schema"), at + ".input_schema"),
                               at, ANTHROPIC_TOOL_NAME))
    choice_value = check_type(body, "tool_choice", dict, "an object") or {"type": "auto"}
    kind = choice_value.get("type")
    if kind == "tool" and isinstance(choice_value.get("name"), str):
        choice = choice_value["name"]
    elif kind in ("auto", "any", "none"):
        choice = {"any": "required"}.get(kind, kind)
    else:
        raise invalid("tool_choice", "`tool_choice.type` must be auto, any, tool (with a "
                      "`name`) or none.")
    offered, choice = choose_tools(offered_tools(tools, "tools"), choice, "tool_choice")
    return offered, choice, choice_value.get("disable_parallel_tool_use") is not True


def parse_messages_request(body: Any) -> Request:
    """Validate a Messages API request; every problem is a 400 naming the field."""
    if not isinstance(body, dict):
        raise invalid("", "The request body must be a JSON object.")
    model, cli_model = resolve_model(body.get("model"))
    system_parts = [system_text(body.get("system"), "system") or ""]
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "`messages` must be a non-empty list.")
    turns: List[Turn] = []
    for i, message in enumerate(messages):
        where = "messages[%d]" % i
        role = message.get("role") if isinstance(message, dict) else None
        if role == "system":  # Claude Code 2.1.331 sends its environment notes this way
            system_parts.append(text_of(anthropic_blocks(message.get("content"), where)))
        elif role in ("user", "assistant"):
            turns.append((role, anthropic_blocks(message.get("content"), where + ".content")))
        else:
            raise invalid(where + ".role", "`role` must be user or assistant.")
    if turns and turns[-1][0] == "assistant":
        raise invalid("messages", "A last assistant message (a prefill to continue) is not "
                      "supported: Claude Code always answers a user turn.")
    check_turns(turns, "messages")
    stream = check_type(body, "stream", bool, "true or false")
    check_numbers(body, ANTHROPIC_NUMBER_RANGES)
    check_type(body, "metadata", dict, "an object")
    if body.get("mcp_servers"):
        raise invalid("mcp_servers", "`mcp_servers` (remote MCP servers) is not supported: an "
                      "API caller cannot make Claude Code connect anywhere.")
    tools, choice, parallel = messages_tools(body)
    config = check_type(body, "output_config", dict, "an object") or {}
    schema = output_schema(config.get("format") or body.get("output_format"),
                           "output_config.format")
    return Request(model=model, cli_model=cli_model,
                   system="\n\n".join(p for p in system_parts if p) or None, turns=turns,
                   stream=bool(stream), max_tokens=optional_int(body, "max_tokens", 1,
                                                                MAX_TOKENS_LIMIT),
                   stop=stop_sequences(body.get("stop_sequences"), "stop_sequences",
                                       MAX_STOP_SEQUENCES),
                   effort=thinking_effort(body), tools=tools, tool_choice=choice,
                   parallel_tools=parallel, output_schema=schema)


def anthropic_usage(usage: Dict[str, Any]) -> Dict[str, int]:
    return {key: count(usage, key) for key in ("input_tokens", "cache_creation_input_tokens",
                                               "cache_read_input_tokens", "output_tokens")}


class MessagesAnswer(Answer):
    """A Messages API `message` and its event stream, in Anthropic's order: message_start,
    ping, per block content_block_start / _delta / _stop, message_delta, message_stop."""

    def event(self, name: str, data: Dict[str, Any]) -> bytes:
        return sse(dict({"type": name}, **data), name)

    def message(self, content: List[Block], stop_reason: Optional[str],
                usage: Dict[str, Any]) -> Dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": content, "stop_reason": stop_reason,
                "stop_sequence": self.finish.stop_sequence, "usage": anthropic_usage(usage)}

    def on_start(self, start: Start) -> bytes:
        return self.event("message_start", {"message": self.message([], None, start.usage)}) + \
            self.event("ping", {})

    def block_starts(self, kind: str) -> bytes:
        index = len(self.blocks) - 1
        empty: Dict[str, Any] = {"type": "text", "text": ""} if kind == "text" else {
            "type": "thinking", "thinking": "", "signature": ""}
        if kind == "tool_use":
            call = self.calls[index]
            empty = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
        return self.event("content_block_start", {"index": index, "content_block": empty})

    def delta(self, kind: str, text: str) -> bytes:
        delta = {"type": "text_delta", "text": text} if kind == "text" else {
            "type": "thinking_delta", "thinking": text} if kind == "thinking" else {
            "type": "input_json_delta", "partial_json": text}
        return self.event("content_block_delta", {"index": len(self.blocks) - 1,
                                                  "delta": delta})

    def block_ends(self) -> bytes:
        return self.event("content_block_stop", {"index": len(self.blocks) - 1})

    def finished(self) -> bytes:
        return self.event("message_delta", {
            "delta": {"stop_reason": self.finish.stop_reason or "end_turn",
                      "stop_sequence": self.finish.stop_sequence},
            "usage": anthropic_usage(self.finish.usage)}) + self.event("message_stop", {})

    def body(self) -> Dict[str, Any]:
        content = [self.call_block(i) if kind == "tool_use" else {"type": "text", "text": text}
                   if kind == "text" else {"type": "thinking", "thinking": text, "signature": ""}
                   for i, (kind, text) in enumerate(map(self.block_text,
                                                        range(len(self.blocks))))]
        return self.message(content, self.finish.stop_reason or "end_turn", self.finish.usage)

    def stream_error(self, error: APIError) -> bytes:
        return sse(anthropic_error(error)[1], "error")


def anthropic_error(error: APIError) -> Tuple[int, Dict[str, Any]]:
    """Anthropic's error shape and types; an overloaded API is its 529."""
    status = 529 if error.code == "overloaded" else error.status
    kind = ANTHROPIC_ERROR_TYPES.get(status, "api_error" if status >= 500 else
                                     "invalid_request_error")
    return status, {"type": "error", "error": {"type": kind, "message": error.message}}


class Messages(Dialect):
    path = "/messages"
    name = "Anthropic Messages"
    id_prefix = "msg_"
    answer_class = MessagesAnswer

    def parse(self, body: Any) -> Request:
        return parse_messages_request(body)

    def error(self, error: APIError) -> Tuple[int, Dict[str, Any]]:
        return anthropic_error(error)


def estimate_tokens(request: Request) -> int:
    """An estimate, not Anthropic's count: about 4 characters a token, IMAGE_TOKENS an image."""
    chars = len(request.system or "") + sum(
        len(t.name) + len(t.description) + len(json.dumps(t.schema)) for t in request.tools)
    images = 0
    pending = [block for _, blocks in request.turns for block in blocks]
    while pending:
        block = pending.pop()
        if block["type"] == "text":
            chars += len(block["text"])
        elif block["type"] == "tool_use":
            chars += len(block["name"]) + len(json.dumps(block["input"]))
        elif block["type"] == "tool_result":
            pending.extend(block["content"])
        elif block["source"].get("type") == "text":
            chars += len(block["source"]["data"])
        else:
            images += 1
    return max(1, (chars + 3) // 4) + images * IMAGE_TOKENS


# -- OpenAI Responses (POST /v1/responses) ------------------------------------

class ResponseStore:
    """Recent responses' conversations, for `previous_response_id`: in memory only, at most
    `items` of them and `size` bytes in all; the oldest go first."""

    def __init__(self, items: int, size: int):
        self.items, self.size = items, size
        self._turns: "collections.OrderedDict[str, Tuple[List[Turn], int]]" = \
            collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, response_id: str, turns: List[Turn]) -> None:
        size = len(json.dumps(turns))
        with self._lock:
            self._turns[response_id] = (turns, size)
            self._bytes += size
            while self._turns and (len(self._turns) > self.items or self._bytes > self.size):
                _, (_, dropped) = self._turns.popitem(last=False)
                self._bytes -= dropped

    def get(self, response_id: str) -> Optional[List[Turn]]:
        with self._lock:
            found = self._turns.get(response_id)
            return list(found[0]) if found else None


def responses_content(content: Any, role: str, where: str) -> List[Block]:
    """A Responses message's content: a string or input_text / input_image / output_text
    parts."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise invalid(where, "`%s` must be a string or a list of content parts." % where)
    blocks = []
    for i, part in enumerate(content):
        at = "%s[%d]" % (where, i)
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "summary_text"):
            if not isinstance(part.get("text"), str):
                raise invalid(at + ".text", "`%s` parts need a string `text`." % kind)
            blocks.append({"type": "text", "text": part["text"]})
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            blocks.append({"type": "text", "text": part["refusal"]})
        elif kind == "input_image" and role != "assistant":
            if not isinstance(part.get("image_url"), str):
                raise invalid(at + ".image_url", "Give images as `image_url` (an https or "
                              "base64 data URL); file ids are not supported.")
            blocks.append(image_block(part["image_url"], at + ".image_url"))
        else:
            raise invalid(at + ".type", "Content part type %r is not supported; use input_text, "
                          "input_image or output_text." % str(kind)[:50])
    return blocks


def responses_turns(items: Any) -> Tuple[List[str], List[Turn]]:
    """Responses `input` -> (system texts, turns). Earlier reasoning items are accepted and
    left out (Codex sends them back); unknown item types are a 400."""
    if isinstance(items, str):
        return [], [("user", [{"type": "text", "text": items}])]
    if not isinstance(items, list) or not items:
        raise invalid("input", "`input` must be a string or a non-empty list of items.")
    system: List[str] = []
    turns: List[Turn] = []
    for i, item in enumerate(items):
        where = "input[%d]" % i
        if not isinstance(item, dict):
            raise invalid(where, "Each input item must be an object.")
        kind = item.get("type", "message")
        if kind == "reasoning":
            continue
        if kind in ("function_call", "custom_tool_call"):
            name = item.get("name")
            if not isinstance(name, str) or not name:
                raise invalid(where + ".name", "A `%s` item needs the tool's `name`." % kind)
            if isinstance(item.get("namespace"), str) and item["namespace"]:
                name = "%s__%s" % (item["namespace"], name)
            arguments = tool_input(item.get("arguments"), where + ".arguments") \
                if kind == "function_call" else {"input": str(item.get("input", ""))}
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise invalid(where + ".call_id", "A `%s` item needs its `call_id`." % kind)
            add_to_turn(turns, "assistant", [{"type": "tool_use", "id": call_id, "name": name,
                                              "input": arguments}])
            continue
        if kind in ("function_call_output", "custom_tool_call_output"):
            output = item.get("output", "")
            add_to_turn(turns, "user", [tool_result(
                item.get("call_id"), responses_content(output, "tool", where + ".output"),
                where + ".call_id")])
            continue
        if kind != "message":
            raise invalid(where + ".type", "Input item type %r is not supported; use message, "
                          "reasoning, function_call or function_call_output items."
                          % str(kind)[:50])
        role = item.get("role")
        if role in ("system", "developer"):
            system.append(text_of(responses_content(item.get("content"), role, where +
                                                    ".content")))
        elif role in ("user", "assistant"):
            add_to_turn(turns, role, responses_content(item.get("content"), role,
                                                       where + ".content"))
        else:
            raise invalid(where + ".role", "Unknown role %r; use user, assistant, system or "
                          "developer." % str(role)[:50])
    return system, turns


def responses_tool(item: Any, at: str, namespace: Optional[str] = None) -> List[Tool]:
    """One entry of a Responses `tools` list as the tools it offers: a function, a freeform
    (custom) tool, the functions of a namespace, or none for a hosted tool."""
    kind = item.get("type") if isinstance(item, dict) else None
    if not isinstance(item, dict) or not isinstance(kind, str):
        raise invalid(at, "Each tool must be an object with a `type`.")
    if kind == "function":
        return [make_tool(item.get("name"), item.get("description"),
                          tool_schema(item.get("parameters"), at + ".parameters"), at,
                          OPENAI_TOOL_NAME, namespace=namespace)]
    if kind == "custom":
        tool = make_tool(item.get("name"), item.get("description"), CUSTOM_TOOL_SCHEMA, at,
                         OPENAI_TOOL_NAME, custom=True, namespace=namespace)
        grammar = item.get("format")
        if isinstance(grammar, dict) and isinstance(grammar.get("definition"), str):
            tool = tool._replace(description="%s\n\nIts input must follow this %s grammar:\n%s"
                                 % (tool.description, grammar.get("syntax", ""),
                                    grammar["definition"]))
        return [tool]
    if kind == "namespace" and namespace is None:
        name = item.get("name")
        if not isinstance(name, str) or not OPENAI_TOOL_NAME.fullmatch(name):
            raise invalid(at + ".name", "A namespace needs a `name` of letters, digits, `_` or "
                          "`-`.")
        about = item.get("description") if isinstance(item.get("description"), str) else ""
        tools = []
        for i, inner in enumerate(check_type(item, "tools", list, "a list") or []):
            for tool in responses_tool(inner, "%s.tools[%d]" % (at, i), name):
                tools.append(tool._replace(description="(%s%s) %s" % (
                    name, ": " + about if about else "", tool.description)))
        return tools
    if HOSTED_TOOL_TYPES.fullmatch(kind):
        leave_out(kind, "OpenAI Responses")
        return []
    raise invalid(at + ".type", "Tool type %r is not supported; use function, custom or "
                  "namespace." % kind[:50])


def responses_tools(body: Dict[str, Any]) -> Tuple[Tuple[Tool, ...], str, bool]:
    """A Responses request's `tools` and `tool_choice`: (offered tools, choice, parallel)."""
    tools: List[Tool] = []
    for i, item in enumerate(check_type(body, "tools", list, "a list of tools") or []):
        tools += responses_tool(item, "tools[%d]" % i)
    value = body.get("tool_choice")
    choice = "auto"
    if value in ("none", "auto", "required"):
        choice = str(value)
    elif isinstance(value, dict) and value.get("type") in ("function", "custom") and \
            isinstance(value.get("name"), str):
        choice = "%s__%s" % (value["namespace"], value["name"]) \
            if isinstance(value.get("namespace"), str) else value["name"]
    elif isinstance(value, dict) and value.get("type") == "allowed_tools":
        names = {t.get("name") for t in value.get("tools") or [] if isinstance(t, dict)}
        tools = [t for t in tools if t.name in names or t.key in names]
        choice = "required" if value.get("mode") == "required" else "auto"
    elif not (value is None or isinstance(value, dict) and isinstance(value.get("type"), str)
              and HOSTED_TOOL_TYPES.fullmatch(value["type"])):
        raise invalid("tool_choice", "`tool_choice` must be none, auto, required or name a "
                      "function.")
    parallel = check_type(body, "parallel_tool_calls", bool, "true or false")
    offered, choice = choose_tools(offered_tools(tools, "tools"), choice, "tool_choice")
    return offered, choice, parallel is not False


def parse_responses_request(body: Any, store: ResponseStore) -> Request:
    """Validate a Responses API request; `previous_response_id` is looked up in `store`."""
    if not isinstance(body, dict):
        raise invalid("", "The request body must be a JSON object.")
    model, cli_model = resolve_model(body.get("model"))
    system, turns = responses_turns(body.get("input"))
    instructions = check_type(body, "instructions", str, "a string")
    previous = check_type(body, "previous_response_id", str, "a string")
    if previous:
        earlier = store.get(previous)
        if earlier is None:
            raise APIError(404, "Previous response with id %r not found." % previous[:100],
                           code="previous_response_not_found", param="previous_response_id")
        turns = earlier + turns
    check_turns(turns, "input")
    reasoning = check_type(body, "reasoning", dict, "an object") or {}
    text = check_type(body, "text", dict, "an object") or {}
    schema = output_schema(text.get("format"), "text.format")
    tools, choice, parallel = responses_tools(body)
    if body.get("background"):
        raise invalid("background", "Background responses are not supported.")
    check_numbers(body, {"temperature": (0, 2), "top_p": (0, 1)})
    store_it = check_type(body, "store", bool, "true or false")
    metadata = check_type(body, "metadata", dict, "an object") or {}
    return Request(model=model, cli_model=cli_model,
                   system="\n\n".join(p for p in [instructions or ""] + system if p) or None,
                   turns=turns, stream=bool(check_type(body, "stream", bool, "true or false")),
                   max_tokens=optional_int(body, "max_output_tokens", 1, MAX_TOKENS_LIMIT),
                   effort=openai_effort(reasoning.get("effort"), "reasoning.effort"),
                   echo={"instructions": instructions, "previous_response_id": previous,
                         "store": store_it is not False, "metadata": metadata,
                         "max_output_tokens": body.get("max_output_tokens"),
                         "reasoning": {"effort": reasoning.get("effort"),
                                       "summary": reasoning.get("summary")},
                         "user": body.get("user"), "temperature": body.get("temperature", 1.0),
                         "top_p": body.get("top_p", 1.0), "text": text.get("format")
                         or {"type": "text"}, "tool_choice": body.get("tool_choice", "auto"),
                         "tools": body.get("tools") or [], "parallel_tool_calls": parallel},
                   tools=tools, tool_choice=choice, parallel_tools=parallel,
                   output_schema=schema)


class ResponsesAnswer(Answer):
    """A `response` object and its event stream: response.created, .in_progress, per output
    item .output_item.added / (.content_part or .reasoning_summary_part).added / deltas /
    .done, then response.completed, .incomplete at the output limit, or .failed. Thinking
    becomes a reasoning item with a summary_text."""

    def __init__(self, request: Request, answer_id: str, streaming: bool,
                 store: ResponseStore):
        super().__init__(request, answer_id, streaming)
        self.store = store
        self.sequence = 0
        self.item_ids: List[str] = []
        self.failed: Optional[APIError] = None

    def event(self, name: str, data: Dict[str, Any]) -> bytes:
        data = dict({"type": name, "sequence_number": self.sequence}, **data)
        self.sequence += 1
        return sse(data, name)

    def item_id(self, index: int) -> str:
        """The id of output item `index`, made when first asked for (a revision may add some)."""
        while len(self.item_ids) <= index:
            at = len(self.item_ids)
            kind = self.blocks[at][0]
            prefix = "rs_" if kind == "thinking" else "msg_" if kind == "text" else \
                "ctc_" if self.calls[at].custom else "fc_"
            self.item_ids.append(prefix + uuid.uuid4().hex)
        return self.item_ids[index]

    def item(self, index: int, done: bool) -> Dict[str, Any]:
        kind, text = self.block_text(index)
        if kind == "tool_use":
            call = self.calls[index]
            item: Dict[str, Any] = {"id": self.item_id(index), "type": "custom_tool_call"
                                    if call.custom else "function_call",
                                    "status": "completed" if done else "in_progress"}
            if call.custom:
                item["input"] = self.custom_input(text) if done else ""
            else:
                item["arguments"] = (text or "{}") if done else ""
            item.update(call_id=call.id, name=call.name)
            if call.namespace:
                item["namespace"] = call.namespace
            return item
        if kind == "thinking":
            return {"id": self.item_id(index), "type": "reasoning",
                    "summary": [{"type": "summary_text", "text": text}] if done else []}
        return {"id": self.item_id(index), "type": "message", "role": "assistant",
                "status": "completed" if done else "in_progress",
                "content": [self.part(text)] if done else []}

    @staticmethod
    def part(text: str) -> Dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def where(self) -> Dict[str, Any]:
        index = len(self.blocks) - 1
        return {"item_id": self.item_id(index), "output_index": index}

    def response(self, status: str) -> Dict[str, Any]:
        echo = self.request.echo
        usage = openai_usage(self.finish.usage)
        incomplete = status == "incomplete"
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "background": False, "error": {"code": self.failed.code or "server_error",
                                           "message": self.failed.message}
            if self.failed else None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": echo.get("instructions"), "max_output_tokens":
                echo.get("max_output_tokens"), "model": self.model,
            "output": [self.item(i, True) for i in range(len(self.blocks))]
            if status != "in_progress" else [],
            "parallel_tool_calls": echo.get("parallel_tool_calls", True),
            "previous_response_id": echo.get("previous_response_id"),
            "reasoning": echo.get("reasoning"), "store": echo.get("store", True),
            "temperature": echo.get("temperature"),
            "text": {"format": echo.get("text") or {"type": "text"}},
            "tool_choice": echo.get("tool_choice", "auto"), "tools": echo.get("tools") or [],
            "top_p": echo.get("top_p"),
            "truncation": "disabled", "user": echo.get("user"),
            "metadata": echo.get("metadata") or {},
            "usage": {"input_tokens": usage["prompt_tokens"],
                      "input_tokens_details": {"cached_tokens":
                                               usage["prompt_tokens_details"]["cached_tokens"]},
                      "output_tokens": usage["completion_tokens"],
                      "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": usage["total_tokens"]}
            if status != "in_progress" else None,
        }

    def status(self) -> str:
        return "incomplete" if self.finish.stop_reason == "max_tokens" else "completed"

    def on_start(self, start: Start) -> bytes:
        return self.event("response.created", {"response": self.response("in_progress")}) + \
            self.event("response.in_progress", {"response": self.response("in_progress")})

    def block_starts(self, kind: str) -> bytes:
        out = self.event("response.output_item.added", {
            "output_index": len(self.blocks) - 1, "item": self.item(len(self.blocks) - 1,
                                                                    False)})
        if kind == "tool_use":
            return out
        if kind == "thinking":
            return out + self.event("response.reasoning_summary_part.added", dict(
                self.where(), summary_index=0, part={"type": "summary_text", "text": ""}))
        return out + self.event("response.content_part.added", dict(
            self.where(), content_index=0, part=self.part("")))

    def delta(self, kind: str, text: str) -> bytes:
        if kind == "tool_use":
            if self.calls[len(self.blocks) - 1].custom:
                return b""  # its input is a string inside the JSON: sent whole when done
            return self.event("response.function_call_arguments.delta", dict(
                self.where(), delta=text))
        if kind == "thinking":
            return self.event("response.reasoning_summary_text.delta", dict(
                self.where(), summary_index=0, delta=text))
        return self.event("response.output_text.delta", dict(
            self.where(), content_index=0, delta=text, logprobs=[]))

    def block_ends(self) -> bytes:
        kind, text = self.block_text(len(self.blocks) - 1)
        if kind == "tool_use" and self.calls[len(self.blocks) - 1].custom:
            value = self.custom_input(text)
            out = self.event("response.custom_tool_call_input.delta", dict(
                self.where(), delta=value)) + self.event(
                "response.custom_tool_call_input.done", dict(self.where(), input=value))
        elif kind == "tool_use":
            out = self.event("response.function_call_arguments.done", dict(
                self.where(), arguments=text or "{}",
                name=self.calls[len(self.blocks) - 1].name))
        elif kind == "thinking":
            out = self.event("response.reasoning_summary_text.done", dict(
                self.where(), summary_index=0, text=text)) + \
                self.event("response.reasoning_summary_part.done", dict(
                    self.where(), summary_index=0, part={"type": "summary_text", "text": text}))
        else:
            out = self.event("response.output_text.done", dict(
                self.where(), content_index=0, text=text, logprobs=[])) + \
                self.event("response.content_part.done", dict(
                    self.where(), content_index=0, part=self.part(text)))
        return out + self.event("response.output_item.done", {
            "output_index": len(self.blocks) - 1, "item": self.item(len(self.blocks) - 1, True)})

    def finished(self) -> bytes:
        if self.request.echo.get("store", True):
            self.store.put(self.id, self.request.turns + [self.turn()])
        status = self.status()
        return self.event("response." + status, {"response": self.response(status)})

    def body(self) -> Dict[str, Any]:
        return self.response(self.status())

    def stream_error(self, error: APIError) -> bytes:
        self.failed = error
        return self.event("response.failed", {"response": self.response("failed")})


class Responses(Dialect):
    path = "/responses"
    name = "OpenAI Responses"
    id_prefix = "resp_"

    def __init__(self) -> None:
        self.store = ResponseStore(RESPONSE_STORE_ITEMS, RESPONSE_STORE_BYTES)  # this daemon's

    def parse(self, body: Any) -> Request:
        return parse_responses_request(body, self.store)

    def answer(self, request: Request, answer_id: str, streaming: bool) -> Answer:
        return ResponsesAnswer(request, answer_id, streaming, self.store)


# The dialects served, each at /v1 + its path; the router and its 404 text read this.
DIALECTS = (ChatCompletions, Messages, Responses)


def model_object(model_id: str) -> Dict[str, Any]:
    return {"id": model_id, "object": "model", "created": MODELS_CREATED, "owned_by": "anthropic"}


def model_list() -> Dict[str, Any]:
    return {"object": "list", "data": [model_object(m) for m in MODEL_ALIASES]}


def anthropic_model(model_id: str) -> Dict[str, Any]:
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(MODELS_CREATED))
    return {"type": "model", "id": model_id, "display_name": model_id, "created_at": created}


def anthropic_model_list() -> Dict[str, Any]:
    models = list(MODEL_ALIASES)
    return {"data": [anthropic_model(m) for m in models], "has_more": False,
            "first_id": models[0], "last_id": models[-1]}


##############################################################################
# Who may use it: keys, browsers, host names (pure functions)
##############################################################################

def split_list(value: Optional[str]) -> List[str]:
    """A comma-separated setting ("a, b,,c") as its non-empty items."""
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def key_digest(key: str) -> bytes:
    # Keys are compared as digests: equal lengths, so the comparison time tells nothing.
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def presented_key(authorization: Optional[str], x_api_key: Optional[str],
                  basic: bool = False) -> Optional[str]:
    """The key a client sent: `Authorization: Bearer KEY` (OpenAI SDKs) or `x-api-key: KEY`;
    with `basic` (the status page, for a browser) also HTTP Basic auth with the key as the
    password, whatever the user name."""
    if authorization:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        if basic and scheme.lower() == "basic" and token.strip():
            try:
                decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return None
            password = decoded.partition(":")[2]
            return password or None
    if x_api_key and x_api_key.strip():
        return x_api_key.strip()
    return None


def key_accepted(key: Optional[str], digests: Iterable[bytes]) -> bool:
    """Whether `key` is one of the configured keys; every key is compared, in constant time."""
    if key is None:
        return False
    given = key_digest(key)
    accepted = False
    for digest in digests:
        accepted |= hmac.compare_digest(given, digest)
    return accepted


def normalize_origin(origin: str) -> str:
    """An Origin as browsers send it: lower-case scheme://host[:port], no trailing slash."""
    return origin.strip().rstrip("/").lower()


def is_loopback(host: str) -> bool:
    """A name or address that can only mean this machine: localhost, *.localhost (RFC 6761;
    browsers resolve it themselves), 127.0.0.0/8, ::1 (also as ::ffff:127.x)."""
    host = host.strip().strip("[]").split("%", 1)[0].rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


def host_name(header: str) -> Optional[str]:
    """The host part of a Host header ("[::1]:3456" -> "::1"); None when it is malformed."""
    header = header.strip().lower()
    if header.startswith("["):
        name, bracket, port = header[1:].partition("]")
        port = port[1:] if port.startswith(":") else port
    else:
        name, _, port = header.partition(":")
        bracket = "]"
    if not name or not bracket or (port and not port.isdigit()):
        return None
    if not re.fullmatch(r"[a-z0-9._:%-]+", name):
        return None
    return name.rstrip(".")


def host_allowed(header: Optional[str], names: Iterable[str], any_address: bool) -> bool:
    """Whether a request's Host header names this server, which defeats DNS rebinding: a page
    whose own name the attacker points at 127.0.0.1 still sends that name as Host.

    Accepted: loopback names and addresses, the names configured (`names`), and, when the
    server listens on every address, any IP address (an address cannot be rebound).
    """
    name = host_name(header or "")
    if name is None:
        return False
    if is_loopback(name) or name in names:
        return True
    if any_address:
        try:
            ipaddress.ip_address(name.split("%", 1)[0])
            return True
        except ValueError:
            return False
    return False


class Access:
    """Who may use the daemon: the Host names that name it, the web pages allowed to (their
    origins), and the keys (their digests). `check` is all a request goes through.

    A web page can make a browser send requests to 127.0.0.1; it always sends an Origin (or at
    least Sec-Fetch-Site) then, and after a DNS rebinding its own name as Host.
    """

    def __init__(self, address: str, allowed_hosts: Iterable[str] = (),
                 cors_origins: Iterable[str] = (), keys: Iterable[str] = ()):
        self.any_address = address in ("", "0.0.0.0", "::")
        self.host_names = {name.lower().strip("[]") for name in allowed_hosts}
        if not self.any_address:
            self.host_names.add(address.lower().strip("[]"))
        self.cors_origins = {normalize_origin(origin) for origin in cors_origins}
        self.key_digests = [key_digest(key) for key in keys]

    def check(self, headers: "email.message.Message", http10: bool,
              page: bool = False) -> Tuple[Optional[str], bool]:
        """(the request's Origin when it is an allowed one, whether it holds a key). Refuses
        (APIError 400 or 403) unknown Host names and pages of other sites; with `page` (the
        status page) the key may also come as a Basic password."""
        hosts = headers.get_all("Host") or []
        if len(hosts) > 1 or (not hosts and not http10):
            raise APIError(400, "Send one Host header.", code="invalid_host")
        if hosts and not host_allowed(hosts[0], self.host_names, self.any_address):
            raise APIError(403, "The Host header %r does not name this server. Use 127.0.0.1 "
                           "or localhost, or allow the name with --allowed-host." % hosts[0][:100],
                           type="permission_error", code="host_not_allowed")
        origin = headers.get("Origin")
        if origin is not None and normalize_origin(origin) not in self.cors_origins:
            raise APIError(403, "Requests from web pages are refused: the origin %r is not "
                           "allowed (--cors-origin)." % origin[:100],
                           type="permission_error", code="origin_not_allowed")
        if origin is None and headers.get("Sec-Fetch-Site", "none").strip().lower() not in (
                "none", "same-origin"):
            raise APIError(403, "Requests from web pages are refused.",
                           type="permission_error", code="origin_not_allowed")
        authorized = not self.key_digests or key_accepted(presented_key(
            headers.get("Authorization"), headers.get("x-api-key"), basic=page),
            self.key_digests)
        return (origin.strip() if origin is not None else None), authorized

    @staticmethod
    def refusal(headers: "email.message.Message", page: bool = False) -> APIError:
        """The 401 of a request without the key (or with a wrong one)."""
        given = headers.get("Authorization") or headers.get("x-api-key")
        return APIError(401, "Incorrect API key provided." if given else
                        "This proxy needs an API key: send `Authorization: Bearer KEY`%s." % (
                            " or log in with any user name and the key as the password"
                            if page else ""), code="invalid_api_key",
                        headers={"WWW-Authenticate": '%s realm="claude-max-proxy"' % (
                            "Basic" if page else "Bearer")})


##############################################################################
# Files the CLI uses: working directories, conversations' sessions (Sessions)
##############################################################################

def make_workdir() -> str:
    """The daemon's private directory (mode 0700): each run's system prompt and tool files sit
    in it for the run's length, with a marker for each session file the run has elsewhere
    (Sessions), and `pid`, so that a later start can tell it was left by a killed daemon."""
    sweep_workdirs()
    workdir = tempfile.mkdtemp(prefix=WORKDIR_PREFIX)
    with open(os.open(os.path.join(workdir, "pid"), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                      0o600), "w") as f:
        f.write("%d\n" % os.getpid())
    return workdir


def shared_dir() -> str:
    """This user's directory that daemons share and keep across restarts (mode 0700): `cwd`,
    the empty working directory of every CLI run, and PREAMBLES_FILE.

    One working directory for all runs and all daemons, not one each: the CLI writes its path
    into every API request, ahead of the conversation, so a path that changed with each run or
    daemon start would keep the prompt cache from covering any conversation. A directory of
    that name that is not this user's alone is not used (OSError)."""
    path = os.path.join(tempfile.gettempdir(), SHARED_DIR % os.getuid())
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise OSError("%s is not a private directory of this user" % path)
    path = os.path.realpath(path)  # the CLI sees (and files its sessions under) the real path
    with contextlib.suppress(FileExistsError):
        os.mkdir(os.path.join(path, "cwd"), 0o700)
    return path


def cli_folder_name(path: str) -> str:
    """What the CLI names its folders for a working directory (sessions, logs): its path with
    every other character than a letter or digit a dash. (Past 200 characters it shortens it
    with a hash; the shared directory's path is far shorter.)"""
    return re.sub(r"[^A-Za-z0-9]", "-", path)


def remove_session_file(path: str) -> None:
    """A session file of Sessions (`<projects>/<slug>/<uuid>.jsonl`), what the CLI may have
    put beside it under the same name, and its directory once empty."""
    name = os.path.basename(path)
    if not (name.endswith(".jsonl") and SESSION_FILE.fullmatch(name[:-6])):
        return  # not one of ours: a marker is only trusted this far
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    shutil.rmtree(path[:-6], ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(path))  # only when empty: other daemons' runs may be in it


def sweep_workdirs(now: Optional[float] = None) -> List[str]:
    """Remove what daemons that were killed (SIGKILL, a crash) left of their make_workdir(),
    the session files its markers name included: this user's directories whose `pid` file
    names a process that is gone, and ones of older versions (no `pid` file) untouched for a
    day. Returns what it removed."""
    removed = []
    root = tempfile.gettempdir()
    now = time.time() if now is None else now
    for name in os.listdir(root):
        path = os.path.join(root, name)
        try:
            if not name.startswith(WORKDIR_PREFIX) or os.lstat(path).st_uid != os.getuid() or \
                    not os.path.isdir(path) or os.path.islink(path):
                continue
            try:
                with open(os.path.join(path, "pid")) as f:
                    pid = int(f.read().strip())
            except FileNotFoundError:
                if now - os.lstat(path).st_mtime < 86400:
                    continue
            else:
                if pid == os.getpid() or pid_alive(pid):
                    continue
            for marker in os.listdir(path):
                if marker.startswith("session-"):
                    with open(os.path.join(path, marker), encoding="utf-8") as f:
                        remove_session_file(f.read().strip())
            shutil.rmtree(path)
            removed.append(path)
        except (OSError, ValueError):
            continue  # another daemon's, being removed, or not ours to judge
    if removed:
        log.info("removed %d working directories that stopped daemons left behind",
                 len(removed))
    return removed


class Sessions:
    """Conversations as real turns: a request with history resumes a session file written for
    it (conversation_history, session_lines), in the CLI's own projects directory for the
    shared working directory, and removed when the run ends. The preamble of those files
    (the rows the CLI adds to a fresh run: environment, model, date) is learnt from a fresh
    run that persists its session, once per CLI, model and day, and kept in PREAMBLES_FILE so
    that a restarted daemon continues its conversations' prefixes. Until it is known, and
    with `enabled` off, a conversation goes as one transcript."""

    def __init__(self, cwd: str, shared: Optional[str], workdir: str, enabled: bool):
        self.cwd, self.workdir, self.enabled = cwd, workdir, enabled
        self.store = os.path.join(shared, PREAMBLES_FILE) if shared else None
        self._lock = threading.Lock()
        self._preambles: Dict[str, List[Dict[str, Any]]] = self._load()
        self.refused: Optional[str] = None  # the CLI (path and version) that refused one
        self.resumed = 0  # runs that resumed a prepared session
        # A projects directory that the runs' sessions bring into being goes with them.
        self._made_projects = not os.path.isdir(os.path.dirname(self.directory()))

    def logs(self) -> str:
        """Where the CLI logs its MCP connections in the working directory (a file per run with
        tools, ~1.5 KB, which it keeps for 30 days): the user's cache folder, same naming."""
        if sys.platform == "darwin":
            cache = os.path.join(os.path.expanduser("~"), "Library", "Caches")
        else:
            cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(
                os.path.expanduser("~"), ".cache")
        return os.path.join(cache, "claude-cli-nodejs", cli_folder_name(self.cwd))

    def directory(self) -> str:
        """Where the CLI keeps sessions of the working directory (its own naming)."""
        config = os.environ.get("CLAUDE_CONFIG_DIR") or os.path.join(
            os.path.expanduser("~"), ".claude")
        return os.path.join(config, "projects", cli_folder_name(self.cwd))

    def key(self, launch: Launch, version: str) -> str:
        """What the preamble's text depends on: the CLI, the model, the day (it is in it), the
        working directory (likewise), whose settings run."""
        return json.dumps([launch.claude, version, launch.request.cli_model,
                           launch.user_settings, self.cwd, time.strftime("%Y-%m-%d")])

    def plan(self, launch: Launch, version: Optional[str]) -> Launch:
        """The launch with its SessionPlan: resumed for a request with history, once the
        preamble is known; a first turn runs fresh, as the CLI starts a conversation itself."""
        version = version or SESSION_VERSION
        if not self.enabled or self.refused == "%s %s" % (launch.claude, version):
            return launch
        key = self.key(launch, version)
        with self._lock:
            preamble = self._preambles.get(key)
        history = conversation_history(launch.request.turns, launch.offered_names(),
                                       bool(launch.request.tools))
        if not history.rows:  # a first turn (user messages only): fresh, as the CLI starts one
            return launch._replace(session=SessionPlan(history, [], key, version,
                                                       learn=preamble is None))
        if preamble is None:  # the transcript, this time
            return launch._replace(session=SessionPlan(None, [], key, version, learn=True))
        return launch._replace(session=SessionPlan(history, preamble, key, version))

    def open(self, launch: Launch) -> Optional[str]:
        """Before a run: the session id it uses, with its marker in the daemon's directory
        and, to resume, its file written (0600, in a 0700 directory)."""
        plan = launch.session
        if plan is None or not (plan.learn or launch.resumed):
            return None
        session_id = str(uuid.uuid4())
        directory = self.directory()
        path = os.path.join(directory, session_id + ".jsonl")
        with open(os.open(os.path.join(self.workdir, "session-" + session_id),
                          os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(path + "\n")
        if launch.resumed is not None:
            text = session_lines(launch.resumed, plan.preamble, session_id, self.cwd,
                                 plan.version.split()[0], launch.request.cli_model, time.time())
            try:
                for _ in range(SESSION_OPEN_TRIES):
                    try:
                        os.makedirs(directory, 0o700, exist_ok=True)
                        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    except (FileNotFoundError, FileExistsError):
                        # It (or its parent) was emptied and removed by another run's end just
                        # now; after mkdir found it there, makedirs raises FileExistsError.
                        continue
                    with open(fd, "w", encoding="utf-8") as f:
                        f.write(text)
                    break
                else:
                    raise FileNotFoundError(directory)
            except OSError:
                self.close(launch, session_id)
                raise
        return session_id

    def learn(self, launch: Launch, session_id: str, wait: float = 0.0) -> bool:
        """Learn a fresh run's preamble from the session file it wrote, waiting up to `wait`
        seconds for the CLI to write it out (it lags behind the answer by some milliseconds,
        and a client's next turn may come before the CLI has exited). True when there was
        nothing to learn (the run was not a learning one) or the preamble was learnt; False
        when its file held none (then the CLI did not write what a session needs)."""
        plan = launch.session
        if plan is None or not plan.learn:
            return True
        deadline = time.monotonic() + wait
        while True:
            try:
                with open(os.path.join(self.directory(), session_id + ".jsonl"),
                          encoding="utf-8") as f:
                    preamble = learnt_preamble(f.read())
            except (OSError, UnicodeDecodeError):
                preamble = None
            if preamble or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        if preamble:
            self._remember(plan.key, preamble)
        return preamble is not None

    def close(self, launch: Launch, session_id: str, finished: bool = False) -> None:
        """After the run: every trace of its session gone (a fresh run's read first)."""
        path = os.path.join(self.directory(), session_id + ".jsonl")
        if not self.learn(launch, session_id) and finished:
            self.refuse(launch, "its session file held no environment rows")
        remove_session_file(path)
        if self._made_projects:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(os.path.dirname(path)))  # only when empty
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.workdir, "session-" + session_id))

    def refuse(self, launch: Launch, why: str) -> None:
        """The CLI did not take a prepared session: transcripts from now on (until it changes),
        said once."""
        plan = launch.session
        cli = "%s %s" % (launch.claude, plan.version if plan else SESSION_VERSION)
        with self._lock:
            if self.refused == cli:
                return
            self.refused = cli
        log.warning("Claude Code (%s) did not take the session prepared for a conversation "
                    "(%s): from now on each conversation reaches it as one transcript, which "
                    "works but keeps the prompt cache from covering earlier turns.", cli,
                    " ".join(why.split())[-300:] or "no output")

    def _remember(self, key: str, preamble: List[Dict[str, Any]]) -> None:
        day = json.loads(key)[-1]
        with self._lock:
            if self._preambles.get(key) == preamble:
                return
            kept = [(k, v) for k, v in self._preambles.items() if json.loads(k)[-1] == day]
            self._preambles = dict(kept[-(PREAMBLES_KEPT - 1):])
            self._preambles[key] = preamble
            if self.store:
                try:
                    write_private(self.store, json.dumps(self._preambles, ensure_ascii=False))
                except OSError as e:
                    log.warning("could not keep the session preamble in %s: %s", self.store, e)

    def _load(self) -> Dict[str, List[Dict[str, Any]]]:
        if not self.store:
            return {}
        try:
            with open(self.store, encoding="utf-8") as f:
                stored = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, UnicodeDecodeError) as e:
            log.warning("ignored %s: %s", self.store, e)
            return {}
        day = time.strftime("%Y-%m-%d")
        good = {}
        for key, rows in stored.items() if isinstance(stored, dict) else ():
            try:
                if json.loads(key)[-1] == day and isinstance(rows, list) and rows and all(
                        isinstance(r, dict) and r.get("type") == "attachment" and
                        isinstance(r.get("rendered"), list) for r in rows):
                    good[key] = rows
            except (ValueError, TypeError, IndexError, KeyError):
                continue
        return good


def write_private(path: str, text: str, mode: int = 0o600) -> None:
    """Replace the file at `path` whole, created with `mode` (0600 for keys)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    partial = "%s.%d.tmp" % (path, os.getpid())
    with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "w",
              encoding="utf-8") as f:
        f.write(text)
    os.chmod(partial, mode)
    os.replace(partial, path)


def write_run_files(workdir: str, files: Mapping[str, str]) -> Dict[str, str]:
    """A run's files (name -> text: its system prompt, its tools for the bridge) written
    private into `workdir`; name -> path. A failure (a full disk) leaves none of them."""
    paths: Dict[str, str] = {}
    try:
        for name, text in files.items():
            path = os.path.join(workdir, "%s-%s.txt" % (name, uuid.uuid4().hex))
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w",
                      encoding="utf-8") as f:
                paths[name] = path
                f.write(text)
    except BaseException:
        remove_files(paths.values())
        raise
    return paths


def remove_files(paths: Iterable[str]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


##############################################################################
# CLI processes: ClaudeCLI, ClaudeProcess, ProcessSlots, WarmPool, ClaudeRun
##############################################################################

def find_claude(configured: Optional[str] = None) -> Optional[str]:
    """The CLI's path: as configured, else on PATH, else where installers put it."""
    if configured:
        if os.sep in configured:
            path = os.path.expanduser(configured)
            return path if os.path.isfile(path) and os.access(path, os.X_OK) else None
        return shutil.which(configured)
    found = shutil.which("claude")
    if found:
        return found
    for candidate in CLAUDE_SEARCH_PATHS:
        path = os.path.expanduser(candidate)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def file_identity(path: str) -> Optional[Tuple[int, float]]:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_mtime


class ClaudeCLI:
    """Finds the CLI and its version; looked up again while missing, so installing it later works."""

    def __init__(self, configured: Optional[str]):
        self.configured = configured
        self._lock = threading.Lock()
        self._path: Optional[str] = None
        self._version: Optional[str] = None
        self._identity: Optional[Tuple[int, float]] = None
        self._problem = "not looked up yet"

    def status(self, wait: bool = True) -> Tuple[Optional[str], Optional[str], str]:
        """(path, version, problem); path is None when the CLI is not usable.

        Without `wait`, while another thread is looking the CLI up (`claude --version` may take
        seconds after an upgrade), the last known answer is given at once.
        """
        if not self._lock.acquire(blocking=wait):
            return self._path, self._version, self._problem
        try:
            return self._look_up()
        finally:
            self._lock.release()

    def _look_up(self) -> Tuple[Optional[str], Optional[str], str]:
        """Find the CLI again if it changed or was never found, and ask its version."""
        if self._path and self._identity == file_identity(self._path):
            return self._path, self._version, ""
        path = find_claude(self.configured)
        if not path:
            where = self.configured or "PATH, " + ", ".join(CLAUDE_SEARCH_PATHS)
            self._path, self._problem = None, (
                "the Claude Code CLI was not found (looked in %s). Install it "
                "(npm install -g @anthropic-ai/claude-code, or see "
                "https://docs.claude.com/en/docs/claude-code/setup), run `claude` once "
                "to log in, or pass --claude-bin." % where)
            return None, None, self._problem
        try:
            out = subprocess.run([path, "--version"], stdin=subprocess.DEVNULL,
                                 capture_output=True, timeout=VERSION_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as e:
            self._path, self._problem = None, "%s --version failed: %s" % (path, e)
            return None, None, self._problem
        version = out.stdout.decode("utf-8", "replace").strip().splitlines()
        if out.returncode != 0 or not version:
            self._path, self._problem = None, "%s --version exited with %d" % (
                path, out.returncode)
            return None, None, self._problem
        self._path, self._version, self._problem = path, version[0], ""
        self._identity = file_identity(path)  # an upgraded or removed CLI is looked at again
        return path, self._version, ""

    def require(self) -> str:
        path, _, problem = self.status()
        if not path:
            raise APIError(503, "Claude Code is unavailable: " + problem, type="server_error",
                           code="claude_unavailable")
        return path


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (a zombie counts: its parent has yet to reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StdinFeed:
    """What goes to a CLI's stdin, written as the pipe takes it: the request's line; for a warm
    CLI, control requests first (stdin_controls), and the line once every one is answered."""

    def __init__(self, line: bytes = b""):
        self._data = memoryview(line)  # what is to be written now
        self._held = b""  # the request's line, written once the CLI has answered its controls
        self.awaiting: "set[str]" = set()  # control requests not answered yet

    def ask(self, line: bytes, controls: List[Dict[str, Any]]) -> None:
        requests = []
        for n, control in enumerate(controls):
            request_id = "proxy_%d" % n
            self.awaiting.add(request_id)
            requests.append(json.dumps({"type": "control_request", "request_id": request_id,
                                        "request": control}, ensure_ascii=False).encode("utf-8")
                            + b"\n")
        self._data = memoryview(b"".join(requests) if requests else line)
        self._held = line if requests else b""

    def answered(self, event: Dict[str, Any]) -> bool:
        """A control_response line: True once every control request has its answer (the
        request's line is to be written then). Raises ControlRefused for a refusal."""
        response = event.get("response")
        response = response if isinstance(response, dict) else {}
        request_id = response.get("request_id")
        if request_id not in self.awaiting:
            return False
        if response.get("subtype") != "success":
            raise ControlRefused(str(response.get("error") or response)[:300])
        self.awaiting.discard(request_id)
        if self.awaiting:
            return False
        self._data, self._held = memoryview(bytes(self._data) + self._held), b""
        return True

    def write(self, fd: int) -> bool:
        """Write what the pipe takes; True when all is written or the CLI stopped reading."""
        try:
            written = os.write(fd, self._data[:READ_CHUNK])
        except BlockingIOError:
            return False
        except OSError:  # BrokenPipeError: the CLI exited; its output says why
            return True
        self._data = self._data[written:]
        return not self._data


class ClaudeProcess:
    """One `claude -p` run: its own process group, the daemon's empty working directory, the
    prompt on stdin, stdout read as stream-json events, stderr drained for its tail."""

    def __init__(self, argv_for: Callable[[Mapping[str, str]], List[str]],
                 stdin_data: Optional[bytes], env: Dict[str, str], files: Mapping[str, str],
                 workdir: str, cwd: str):
        """`files` (name -> text) are written, private, into `workdir` (make_workdir()) and
        removed by close(); `argv_for(paths)` gives the command line once they exist (paths:
        name -> path); `cwd` is the working directory (shared_dir()'s). Without `stdin_data`
        the process is a warm one: it waits on stdin for begin()."""
        self._files = write_run_files(workdir, files)  # outside the tree the CLI works in
        self.argv: List[str] = argv_for(dict(self._files))
        self._stdin = StdinFeed(stdin_data or b"")
        self._writing = False  # stdin is registered for writing (events)
        self.idle = stdin_data is None  # a warm process that has no request yet
        self.handed = False  # a warm process that was given one (begin)
        self._stderr = bytearray()
        self.identity = file_identity(self.argv[0])  # an upgraded CLI has another
        # When it was started, and when it was given its request (its deadlines count from it).
        self.spawned = self.asked_at = time.monotonic()
        try:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, cwd=cwd, env=env,
                start_new_session=True, close_fds=True)
        except OSError as e:
            remove_files(self._files.values())
            raise APIError(503, "Could not start Claude Code (%s): %s" % (self.argv[0], e),
                           type="server_error", code="claude_unavailable") from None
        self.pid = self.proc.pid
        self._closed = False
        self.stopped_by: Optional[int] = None  # the strongest signal the daemon ended it with
        # Whether it printed its `system/init` line or any non-system line: it took its request.
        # (A CLI prints other system lines before it reads stdin: 2.1.331 `ui_invalidate`.)
        self.took_request = False
        self.gave_result = False  # it printed its result (an error's too): it exits by itself
        self.session: Optional[str] = None  # set by the server: the session id the run uses
        self.launch: Optional[Launch] = None  # set by the server: what it runs
        self.sequence = 0  # set by the server: its count of CLI processes started, with this one
        self.peers_at_start = 0  # other CLI processes alive when this one started

    def stderr_tail(self) -> str:
        return self._stderr.decode("utf-8", "replace").strip()

    def begin(self, stdin_data: bytes, controls: List[Dict[str, Any]]) -> None:
        """Give a warm process its request: `controls` (stdin_controls) first, each answered
        before the request's line goes, then the line. Its deadlines count from now."""
        self._stdin.ask(stdin_data, controls)
        self.idle, self.handed = False, True
        self.asked_at = time.monotonic()

    def events(self, timeout: float, idle_timeout: float,
               watch: Optional[socket.socket] = None,
               on_wait: Optional[Callable[[], None]] = None) -> Iterator[Dict[str, Any]]:
        """Parsed stdout lines, as they come. Feeds stdin and drains stderr meanwhile;
        `on_wait()` is called each time all that was read has been given and it is about to
        wait for the CLI (a stream's writer sends then what it gathered).

        Raises APIError(504) on the whole-request or idle deadline, and ClientDisconnected when
        `watch` (the client's socket) is closed by the other side.
        """
        proc = self.proc
        assert proc.stdin and proc.stdout and proc.stderr and not self.idle
        deadline = self.asked_at + timeout
        idle_deadline = time.monotonic() + idle_timeout
        control_deadline = self.asked_at + CONTROL_TIMEOUT
        with selectors.DefaultSelector() as sel:
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin, selectors.EVENT_WRITE, "stdin")
            self._writing = True
            sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
            sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
            if watch is not None:
                sel.register(watch, selectors.EVENT_READ, "client")
            unfinished = bytearray()  # the start of a stdout line
            stdout_open = True
            while stdout_open:
                now = time.monotonic()
                if now >= deadline:
                    raise APIError(504, "Claude Code did not finish within %g s." % timeout,
                                   type="server_error", code="timeout")
                if now >= idle_deadline:
                    raise APIError(504, "Claude Code printed nothing for %g s." % idle_timeout,
                                   type="server_error", code="timeout")
                if self._stdin.awaiting and now >= control_deadline:
                    raise ControlRefused("no answer within %g s" % CONTROL_TIMEOUT)
                if on_wait is not None:
                    on_wait()
                for key, _ in sel.select(min(deadline, idle_deadline, control_deadline
                                             if self._stdin.awaiting else deadline) - now):
                    if key.data == "stdin":
                        self._write_stdin(sel)
                    elif key.data == "stderr":
                        self._read_stderr(sel)
                    elif key.data == "client":
                        assert watch is not None
                        if client_gone(watch):
                            raise ClientDisconnected()
                        sel.unregister(watch)  # the client sent more (pipelining): stop watching
                    else:
                        data = os.read(proc.stdout.fileno(), READ_CHUNK)
                        if not data:
                            stdout_open = False
                            break
                        idle_deadline = time.monotonic() + idle_timeout
                        yield from self._lines(unfinished, data, sel)
            self._drain_stderr(sel)
            event = parse_cli_line(bytes(unfinished))  # a last line without its newline
            if event is not None:
                yield event

    def _lines(self, unfinished: bytearray, data: bytes,
               sel: selectors.BaseSelector) -> Iterator[Dict[str, Any]]:
        """The events of the lines `data` completes; the start of the next line stays in
        `unfinished`. Control responses are taken here (they answer begin()'s requests)."""
        if b"\n" not in data:  # part of a long line: no need to rescan it
            unfinished += data
        else:
            *lines, rest = (unfinished + data).split(b"\n")
            unfinished[:] = rest
            for line in lines:
                event = parse_cli_line(line)
                if event is None:
                    continue
                if self._stdin.awaiting and event.get("type") == "control_response":
                    self._control_answered(event, sel)
                    continue
                kind = event.get("type")
                self.took_request = self.took_request or kind != "system" or \
                    event.get("subtype") == "init"
                self.gave_result = self.gave_result or kind == "result"
                yield event
        if len(unfinished) > MAX_CLI_LINE_BYTES:
            raise APIError(502, "Claude Code printed a line longer than %d bytes."
                           % MAX_CLI_LINE_BYTES, type="server_error", code="claude_error")

    def _control_answered(self, event: Dict[str, Any], sel: selectors.BaseSelector) -> None:
        """A control response: once all are in, the request's line is written after them."""
        assert self.proc.stdin
        if self._stdin.answered(event) and not self._writing:
            sel.register(self.proc.stdin, selectors.EVENT_WRITE, "stdin")
            self._writing = True

    def _write_stdin(self, sel: selectors.BaseSelector) -> None:
        """Write what the pipe takes; once all is written, stop (and close stdin, unless
        control responses are awaited: the request's line comes after them)."""
        assert self.proc.stdin
        if self._stdin.write(self.proc.stdin.fileno()):
            sel.unregister(self.proc.stdin)
            self._writing = False
            if not self._stdin.awaiting:
                self.proc.stdin.close()

    def _drain_stderr(self, sel: selectors.BaseSelector) -> None:
        """The rest of stderr, for error messages: the CLI writes it just before it exits."""
        for key in list(sel.get_map().values()):
            if key.data != "stderr":
                sel.unregister(key.fileobj)
        drain_until = time.monotonic() + KILL_GRACE
        while sel.get_map() and sel.select(max(0.0, drain_until - time.monotonic())):
            self._read_stderr(sel)

    def _read_stderr(self, sel: selectors.BaseSelector) -> None:
        assert self.proc.stderr
        data = os.read(self.proc.stderr.fileno(), READ_CHUNK)
        if not data:
            sel.unregister(self.proc.stderr)
        self._stderr += data
        del self._stderr[:-STDERR_TAIL_BYTES]

    def exited(self) -> bool:
        """Whether the group leader has exited, without reaping it: while it is an unreaped
        zombie its pid, the group's id, cannot be reused, so signalling the group stays safe."""
        try:
            return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def _wait_exit(self, seconds: float) -> bool:
        """Whether the CLI exits within `seconds`; what it still prints meanwhile is read and
        dropped. Its output pipes stay open until it has exited: with them closed (or full)
        2.1.331 takes some 2 s to exit, SIGTERM or not, against 0.1 s (measured)."""
        deadline = time.monotonic() + seconds
        with selectors.DefaultSelector() as sel:
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream and not stream.closed:
                    os.set_blocking(stream.fileno(), False)
                    sel.register(stream, selectors.EVENT_READ)
            while not self.exited():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                if not sel.get_map():
                    time.sleep(min(remaining, 0.02))
                for key, _ in sel.select(min(remaining, 0.02)) if sel.get_map() else ():
                    try:
                        if not os.read(key.fd, READ_CHUNK):
                            sel.unregister(key.fileobj)
                    except BlockingIOError:
                        pass
                    except OSError:
                        sel.unregister(key.fileobj)
        return True

    def signal(self, sig: int) -> None:
        """Signal the whole process group (safe from any thread until close() has reaped it)."""
        if self.proc.returncode is not None:
            return
        if not self.exited():  # the daemon ends it, rather than what is left of its group
            self.stopped_by = max(self.stopped_by or 0, sig)
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self, finished: bool = False) -> Optional[int]:
        """End the whole process group and reap the CLI; returns its exit code. Idempotent.

        `finished`: the answer is complete and the CLI is exiting by itself, so it gets
        EXIT_GRACE before being signalled, as does a CLI that printed its result (an error's);
        otherwise (client gone, timeout, stop sequence, a tool call) it is ended now.
        """
        if self._closed:
            return self.proc.returncode
        self._closed = True
        if self.proc.stdin:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        if not ((finished or self.gave_result) and self._wait_exit(EXIT_GRACE)):
            self.signal(signal.SIGTERM)
            self._wait_exit(KILL_GRACE)
        # Anything left in the group (children the CLI started) goes too, leader included.
        self.signal(signal.SIGKILL)
        code = self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                with contextlib.suppress(OSError):
                    stream.close()
        remove_files(self._files.values())
        return code

    def outcome(self) -> str:
        """How the CLI ended, for the log, once close() has reaped it: `finished` (exit code 0
        by itself), `stopped` (ended by the daemon: after a tool call or a stop sequence, for a
        client that left, at a timeout or shutdown), `killed` (the same, but it had to be
        SIGKILLed), `signal:NAME` (killed by someone else), `exit:N` (an exit code of its own)."""
        code = self.proc.returncode
        if self.stopped_by is not None:
            return "killed" if self.stopped_by == signal.SIGKILL else "stopped"
        if code == 0:
            return "finished"
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                return "signal:" + signal.Signals(-code).name
            return "signal:%d" % -code
        return "exit:%s" % code


def client_gone(sock: socket.socket) -> bool:
    """Whether the client has closed its side of the connection. Never blocks."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    if not poller.poll(0):
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError, socket.timeout):
        return False
    except OSError:
        return True


class ProcessSlots:
    """At most `limit` CLI processes at once, warm ones (WarmPool) included. Later requests
    wait their turn in arrival order, at most `max_waiting` of them and each for at most its
    timeout; the rest get a 429. A request never waits for an idle warm process: `reclaim()`
    ends one and hands its slot over."""

    def __init__(self, limit: int, max_waiting: int):
        self.limit = limit
        self.max_waiting = max_waiting
        self.running = 0
        self._waiting: "collections.deque[object]" = collections.deque()
        self._changed = threading.Condition()
        self._closed = False
        self._reclaim: Callable[[], bool] = lambda: False
        self._released: Callable[[], None] = lambda: None

    def attach(self, reclaim: Callable[[], bool], released: Callable[[], None]) -> None:
        """The warm pool's hooks: `reclaim()` ends an idle warm process, True if there was
        one (its slot is then the caller's); `released()` is told of every slot given back."""
        self._reclaim, self._released = reclaim, released

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiting)

    def acquire(self, timeout: float, client_gone: Callable[[], bool] = lambda: False) -> float:
        """Take a slot, to be given back with release(); returns the seconds spent waiting.

        Raises APIError(429) when the queue is full or `timeout` runs out, APIError(503) once
        closed, and ClientDisconnected when `client_gone()` says the client left meanwhile.
        """
        begun = time.monotonic()
        ticket = object()
        with self._changed:
            self._check_open()
            if not self._waiting and self._take():
                return 0.0
            if len(self._waiting) >= self.max_waiting:
                raise self._busy("%d requests are running and %d more are waiting, as many as "
                                 "--max-queue allows" % (self.running, len(self._waiting)),
                                 "queue_full")
            self._waiting.append(ticket)
            try:
                while not (self._waiting[0] is ticket and self._take()):
                    self._check_open()
                    remaining = begun + timeout - time.monotonic()
                    if remaining <= 0:
                        raise self._busy("no Claude Code slot (--max-concurrency %d) came free "
                                         "within %g s" % (self.limit, timeout), "queue_timeout")
                    self._changed.wait(min(remaining, CLIENT_CHECK_INTERVAL))
                    if client_gone():
                        raise ClientDisconnected()
                self._waiting.popleft()
                return time.monotonic() - begun
            finally:
                if ticket in self._waiting:  # gave up: the next in line may be able to go
                    self._waiting.remove(ticket)
                self._changed.notify_all()

    def try_acquire(self) -> bool:
        """A slot for a warm process: only a free one nobody is waiting for."""
        with self._changed:
            if self._closed or self._waiting or self.running >= self.limit:
                return False
            self.running += 1
            return True

    def release(self) -> None:
        with self._changed:
            self.running -= 1
            self._changed.notify_all()
        self._released()

    def close(self) -> None:
        """At shutdown: nobody waits any more, and no new slot is given."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def _take(self) -> bool:
        """A free slot, or an idle warm process's (under the lock)."""
        if self.running < self.limit:
            self.running += 1
            return True
        return self._reclaim()

    def _check_open(self) -> None:
        if self._closed:
            raise APIError(503, "claude-max-proxy is shutting down.", type="server_error",
                           code="shutting_down")

    @staticmethod
    def _busy(why: str, code: str) -> APIError:
        return APIError(429, "claude-max-proxy is busy: %s. Try again shortly." % why,
                        type="rate_limit_error", code=code, retry_after=QUEUE_RETRY_AFTER)


class Wanted(NamedTuple):
    """A request shape the warm pool keeps a process ready for."""
    launch: Launch  # the latest request of that shape, as it was run
    used: float  # when a request of that shape last came (monotonic)
    again: bool  # whether another request of it is likely: not for a conversation's next turn
    copies: int = 1  # how many to keep ready: 2 for the one shape in steady use (WARM_STEADY)


class WarmPool:
    """CLI processes started ahead of requests, waiting on stdin (a fresh CLI gives its first
    token ~0.75 s after it is started, one that waits ~0.15 s after its line: measured with
    2.1.331 here): one for each of the `size` request shapes (warm_key) used last.

    A request of a shape that has one takes it, its slot included, and a new one is started
    for the next request of that shape; a conversation's answer has one started for the turn
    that follows it (predict), once a conversation went on here lately. A new shape takes the
    place of the least recently used one of its kind (a next turn's, or a repeatable shape's),
    so that one-off questions and conversations do not crowd each other out. The pool's thread
    starts them, a free slot permitting (ProcessSlots: never while requests wait, and an idle
    one is ended for any request that needs its slot), and ends them when they have waited
    `idle_limit` seconds (a shape used within WARM_KEY_KEPT gets a new one), when the CLI
    binary changed, or when their shape is no longer wanted. One that died while it waited is
    replaced within WARM_CHECK_INTERVAL and never handed out; one that dies just as it is
    handed out leaves its request to a fresh CLI (ClaudeRun).

    Starting one costs ~0.9 CPU-seconds, so none starts while any request is being answered:
    only once the daemon has been quiet for WARM_QUIET, one at a time. The one shape in steady
    use keeps a second one ready (WARM_STEADY), for a request that follows the previous at once
    (an agent's loop), as its replacement waits for the quiet moment."""

    def __init__(self, server: "ProxyServer", size: int, idle_limit: float):
        self.server, self.size, self.idle_limit = server, size, idle_limit
        self._changed = threading.Condition()
        # Waiting processes by shape, least recently used shape first.
        self._ready: "collections.OrderedDict[str, List[ClaudeProcess]]" = \
            collections.OrderedDict()
        self._wanted: "collections.OrderedDict[str, Wanted]" = collections.OrderedDict()
        self._starting: "set[str]" = set()
        self._ending: List[Tuple[ClaudeProcess, bool]] = []  # (process, its slot to give back)
        self._closed = False
        self._conversing = -WARM_KEY_KEPT  # when a conversation last went on (monotonic)
        self._no_slot = False  # the last start found no free slot: wait for one to be given back
        self.strict = False  # set when the CLI took no control request: model etc. in the key
        self._deaths: Dict[str, int] = {}  # warm CLIs of a shape that died unused, in a row
        self.hits = self.misses = 0
        self._thread: Optional[threading.Thread] = None
        if size:
            server.slots.attach(self._reclaim, self._poke)
            self._thread = threading.Thread(target=self._run, name="warm-pool", daemon=True)
            self._thread.start()

    @property
    def ready(self) -> int:
        """How many wait now. Under the lock: /health asks from a request's thread while the
        pool's thread changes `_ready`, and iterating a dict that changes raises."""
        with self._changed:  # (a Condition's own lock is reentrant: status() holds it too)
            return sum(len(processes) for processes in self._ready.values())

    def idle_processes(self) -> List["ClaudeProcess"]:
        """The processes waiting now, least recently used shape first (for tests)."""
        with self._changed:
            return [process for processes in self._ready.values() for process in processes]

    def settled(self) -> bool:
        """Whether each shape wanted has its processes waiting (for tests and the benchmark)."""
        with self._changed:
            return not self._starting and not self._ending and all(
                len(self._ready.get(key, ())) >= wanted.copies
                for key, wanted in self._wanted.items())

    def wake(self) -> None:
        """The daemon's last request in flight ended: the quiet moment warm CLIs start in."""
        with self._changed:
            self._changed.notify_all()

    def status(self) -> Dict[str, Any]:
        """For /health: how many wait, and how often a request found one of its shape."""
        with self._changed:
            asked = self.hits + self.misses
            return {"ready": self.ready, "size": self.size, "hits": self.hits,
                    "misses": self.misses,
                    "hit_rate": round(self.hits / asked, 3) if asked else None}

    def take(self, launch: Launch) -> Optional["ClaudeProcess"]:
        """The warm process for `launch`'s shape, with its slot, or None (then one is started
        for the next request like it)."""
        key = warm_key(launch, self.strict) if self.size else None
        if key is None:
            return None
        with self._changed:
            if self._closed:
                return None
            if launch.resumed is None:  # kept without its prompt, which goes on stdin
                bare = launch._replace(request=launch.request._replace(turns=[]), session=None)
                now, before = time.monotonic(), self._wanted.get(key)
                steady = before is not None and now - before.used < WARM_STEADY
                self._want(key, Wanted(bare, now, True, 2 if steady else 1))
            else:  # a conversation's turn: wanted once, if predicted
                self._wanted.pop(key, None)
                self._conversing = time.monotonic()
            # One being started this moment (a conversation's next turn, say) is worth the wait.
            self._changed.wait_for(lambda: key not in self._starting or self._ready.get(key),
                                   timeout=WARM_START_WAIT)
            process = self._pop(key)
            self._changed.notify_all()
        if process is not None and not self._usable(process):
            if process.exited():
                with self._changed:
                    self._died(key, process)
            self._finish(process, True)
            process = None
        with self._changed:
            if process is None:
                self.misses += 1
            else:
                self.hits += 1
                self._deaths.pop(key, None)
        return process

    def predict(self, launch: Launch, answer: "Answer") -> None:
        """After a conversation's answer: a process for its next turn, the session as it will
        be once the client sends the answer back with a new message."""
        request = launch.request
        if not self.size or self._closed or launch.session is None or \
                launch.session.history is None or answer.calls or not answer.text():
            return
        if launch.resumed is None and time.monotonic() - self._conversing > WARM_KEY_KEPT:
            return  # a first turn, and no conversation went on lately: one question, likely
        turns = request.turns + [answer.turn(), ("user", [{"type": "text", "text": "?"}])]
        try:
            following = self.server.launch(request._replace(turns=turns))
        except APIError:
            return
        key = warm_key(following, self.strict)
        if key is not None and following.resumed is not None:
            with self._changed:
                self._want(key, Wanted(following, time.monotonic(), False))
                self._changed.notify_all()

    def refuse_controls(self, why: str) -> None:
        """The CLI took no control request: from now on a warm process must match the model and
        system prompt too."""
        with self._changed:
            if self.strict:
                return
            self.strict = True
            self._wanted.clear()
            self._ending += [(process, True) for processes in self._ready.values()
                             for process in processes]
            self._ready.clear()
            self._changed.notify_all()
        log.warning("a warm Claude Code did not take the model or system prompt on stdin (%s): "
                    "warm processes are kept per model and system prompt from now on", why)

    def close(self) -> None:
        """At shutdown: no new warm process, and the idle ones end."""
        with self._changed:
            self._closed = True
            self._wanted.clear()
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _want(self, key: str, wanted: Wanted) -> None:
        """(Under the lock.) `key` is the most recent shape. Beyond `size`, the least recently
        used of its kind goes (a next turn for an older next turn, a shape for a shape, so that
        neither crowds the other out), else the least recently used of all."""
        self._wanted.pop(key, None)
        while len(self._wanted) >= self.size:
            old = next((k for k, w in self._wanted.items() if w.again == wanted.again),
                       next(iter(self._wanted)))
            del self._wanted[old]
            self._ending += [(process, True) for process in self._ready.pop(old, [])]
        if wanted.copies > 1:  # one shape in steady use at a time: the others keep one
            for other, before in list(self._wanted.items()):
                if before.copies > 1:
                    self._wanted[other] = before._replace(copies=1)
                    kept = self._ready.get(other)
                    if kept:
                        self._ending += [(process, True) for process in kept[1:]]
                        del kept[1:]
        self._wanted[key] = wanted

    def _pop(self, key: str) -> Optional["ClaudeProcess"]:
        """(Under the lock.) The longest waiting process of `key`, taken out of the pool."""
        processes = self._ready.get(key)
        if not processes:
            return None
        process = processes.pop(0)
        if not processes:
            del self._ready[key]
        return process

    def _died(self, key: str, process: "ClaudeProcess") -> None:
        """(Under the lock.) The waiting CLI of `key` died unused (killed, crashed): it is
        replaced, unless that happened WARM_DEATHS times in a row; then it waits for a request
        of the shape."""
        deaths = self._deaths[key] = self._deaths.get(key, 0) + 1
        given_up = deaths >= WARM_DEATHS
        if given_up:
            self._wanted.pop(key, None)
        log.warning("a warm Claude Code (pid %d) died while it waited for a request; %s",
                    process.pid, "none is started again until a request needs one" if given_up
                    else "another is started")

    def _usable(self, process: "ClaudeProcess") -> bool:
        return not process.exited() and process.identity == file_identity(process.argv[0]) \
            and time.monotonic() - process.spawned < self.idle_limit

    def _reclaim(self) -> bool:
        """(Under the slots' lock.) End the longest-unused idle process; its slot is the
        caller's."""
        with self._changed:
            if not self._ready:
                return False
            process = self._pop(next(iter(self._ready)))
            assert process is not None
            self._ending.append((process, False))
            self._changed.notify_all()
            return True

    def _poke(self) -> None:
        """A slot was given back."""
        with self._changed:
            self._no_slot = False
            self._changed.notify_all()

    def _finish(self, process: "ClaudeProcess", give_back: bool) -> None:
        try:
            self.server.end_process(process, False)
        finally:
            if give_back:
                self.server.slots.release()

    def _run(self) -> None:
        """The pool's thread: ends what is to end, starts what is wanted, a slot permitting
        and the daemon quiet, one at a time."""
        while True:
            with self._changed:
                now = time.monotonic()
                self._sweep(now)
                ending, self._ending = self._ending, []
                missing = self._missing()
                quiet = self.server.quiet_for()
                if not ending and not self._closed and (
                        not missing or self._no_slot or quiet is None or quiet < WARM_QUIET):
                    self._changed.wait(self._pause(now, bool(missing), quiet))
                    continue
                if self._closed:
                    ending += [(process, True) for processes in self._ready.values()
                               for process in processes]
                    self._ready.clear()
                    missing = []
                self._starting.update(k for k, _ in missing[:1])
            for process, give_back in ending:
                self._finish(process, give_back)
            if self._closed and not ending:
                return
            if missing:
                self._start(*missing[0])

    def _sweep(self, now: float) -> None:
        """(Under the lock.) The waiting processes that waited too long, died, or are of a CLI
        since upgraded are to end; their shape is wanted again only if it is in use."""
        for key, processes in list(self._ready.items()):
            for process in [p for p in processes if not self._usable(p)]:
                processes.remove(process)
                self._ending.append((process, True))
                wanted = self._wanted.get(key)
                if process.exited():
                    self._died(key, process)
                elif wanted and not (wanted.again and now - wanted.used < WARM_KEY_KEPT):
                    del self._wanted[key]
            if not processes:
                del self._ready[key]

    def _missing(self) -> List[Tuple[str, Wanted]]:
        """(Under the lock.) The shapes short of their processes, most recently used first;
        the first of a shape before a second of another."""
        missing = [(key, wanted) for key, wanted in reversed(self._wanted.items())
                   if len(self._ready.get(key, ())) < wanted.copies]
        missing.sort(key=lambda item: item[0] in self._ready)
        return missing

    def _pause(self, now: float, missing: bool, quiet: Optional[float]) -> float:
        """(Under the lock.) How long the thread may sleep: until a waiting process's time is
        up, the next look at the waiting ones, or the quiet moment a start waits for."""
        waiting = [p for processes in self._ready.values() for p in processes]
        soonest = min([p.spawned + self.idle_limit for p in waiting]
                      + [now + WARM_CHECK_INTERVAL if waiting or missing else
                         now + self.idle_limit]
                      + ([now + WARM_QUIET - quiet] if missing and quiet is not None
                         and not self._no_slot else []))
        return max(0.01, soonest - now)

    def _start(self, key: str, wanted: Wanted) -> None:
        """(The pool's thread.) A warm process for `key`, a slot permitting."""
        process = None
        try:
            with self._changed:
                self._no_slot = True  # until _poke(), unless this start gets one
            if self.server.slots.try_acquire():
                with self._changed:
                    self._no_slot = False
                try:
                    process = self.server.start_process(wanted.launch, warm=True)
                except (APIError, OSError) as e:
                    self.server.slots.release()
                    log.debug("could not start a warm Claude Code: %s", e)
                    with self._changed:
                        self._wanted.pop(key, None)  # until a request of it comes again
        finally:
            with self._changed:
                self._starting.discard(key)
                if process is not None:
                    if self._closed or key not in self._wanted:
                        self._ending.append((process, True))
                    else:
                        self._ready.setdefault(key, []).append(process)
                self._changed.notify_all()


class ClaudeRun:
    """One request's use of the CLI, from its place in line to the reaped process:

        with ClaudeRun(server, launch, client_socket, note) as run:
            for event in run.events(): ...

    Entering takes a warm CLI of the request's shape (WarmPool), its slot with it, or waits
    for a slot (ProcessSlots); leaving ends and reaps the CLI, then frees the slot. `note`
    collects what the request's log line tells (warm, queued, retried, how the CLI ended)."""

    def __init__(self, server: "ProxyServer", launch: Launch, client: socket.socket,
                 note: Dict[str, Any], on_wait: Optional[Callable[[], None]] = None):
        """`on_wait`: called whenever the events read so far are given and the CLI's next
        output is awaited (ClaudeProcess.events)."""
        self.server, self.launch, self.client, self.note = server, launch, client, note
        self.on_wait = on_wait
        self.process: Optional[ClaudeProcess] = None
        self.warm: Optional[ClaudeProcess] = None  # a warm CLI to hand the request to
        self.finished = False  # the CLI gave its result and is exiting by itself
        self._slot = contextlib.ExitStack()

    def __enter__(self) -> "ClaudeRun":
        self.warm = self.server.warm.take(self.launch)
        if self.warm is None:
            waited = self.server.slots.acquire(self.server.settings.queue_timeout,
                                               lambda: client_gone(self.client))
            if waited:
                self.note["queued"] = "%.2fs" % waited
        self._slot.callback(self.server.slots.release)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        try:
            self._end()
        finally:
            self._slot.close()

    def events(self) -> Generator[Event, None, None]:
        """Completion events from the CLI.

        An authentication failure while other CLI processes were starting is retried once with
        a fresh CLI: when several start together, one may be refreshing the subscription's
        login token while another reads the old one. A CLI that does not take the session it
        is given (it prints nothing and exits) gets the conversation as a transcript. A warm
        CLI that ends before it printed anything, or does not answer its control requests,
        leaves the request to a fresh one.
        """
        retried = refused = ""  # why a retry was made: a 401, the session refused
        refused_launch = self.launch
        while True:
            process = self._next_process()
            answered = False
            try:
                for event in self._completion(process):
                    if refused and not answered:  # the transcript works: the session did not
                        self.server.sessions.refuse(refused_launch, refused)
                    answered = True
                    yield event
                return
            except ControlRefused as e:
                self.server.warm.refuse_controls(str(e))
                self.note["warm"] = "refused"
            except CLIEndedWithoutResult:
                why = self._ended_unanswered(process)  # raises unless a retry can help
                if why is not None:
                    refused, refused_launch = why, self.launch
                    self.launch = self.launch._replace(session=None)
            except APIError as error:
                if (error.status != 401 or answered or retried
                        or not self.server.overlapped(process)):
                    raise
                self.note["retried"] = retried = "401"
            self._end()

    def _next_process(self) -> ClaudeProcess:
        """The warm CLI taken for the request, given its request now, or else a fresh one."""
        self.process, self.warm = self.warm, None
        if self.process is None:
            self.process = self.server.start_process(self.launch)
        else:
            self.process.begin(self.launch.stdin(), stdin_controls(
                self.launch, self.process.launch) if self.process.launch else [])
            self.server.begun(self.process, self.launch)
            self.note["warm"] = "%.1fs" % (self.process.asked_at - self.process.spawned)
        return self.process

    def _completion(self, process: ClaudeProcess) -> Iterator[Event]:
        """`process`'s lines as completion events; a finished answer is counted, and its
        session learnt from."""
        settings, request = self.server.settings, self.launch.request
        for event in completion_events(
                self._watched(process.events(settings.timeout, settings.idle_timeout,
                                             watch=self.client, on_wait=self.on_wait)),
                request.stop, max_tokens_ends=request.max_tokens is not None,
                tools=self.launch.model_tools(), schema=request.output_schema,
                single_call=not request.parallel_tools):
            if isinstance(event, Finish):
                self.finished = not event.cut_short
                self.server.subscription.spent(event.usage)
                if process.session and process.launch:
                    self.server.sessions.learn(process.launch, process.session, wait=LEARN_WAIT)
            yield event

    def _ended_unanswered(self, process: ClaudeProcess) -> Optional[str]:
        """`process` ended with no result. A warm CLI that ended before it took the request:
        None, a fresh one takes it. A CLI that never took its session (a CLI whose format
        changed): why, and the conversation goes as a transcript. Anything else: the 502."""
        code = process.close()
        if self.server.stopping.is_set():
            raise APIError(503, "claude-max-proxy is shutting down; the request was ended.",
                           type="server_error", code="shutting_down") from None
        tail = process.stderr_tail()
        if process.handed and not process.took_request:
            log.debug("a warm Claude Code ended unused (exit code %s): %s", code, tail[-300:])
            self.note["warm"] = "ended"
            return None
        if process.session and not process.took_request:
            self.note["history"] = "transcript"
            return tail or "exit code %s" % code
        raise APIError(502, "Claude Code exited (code %s) without an answer. %s" % (
            code, ("Its last output: " + tail[-1000:]) if tail else "It printed nothing."),
            type="server_error", code="claude_error") from None

    def _watched(self, lines: Iterator[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
        """The CLI's lines, as the subscription learns from them on their way."""
        subscription = self.server.subscription
        for line in lines:
            kind = line.get("type")
            if kind == "rate_limit_event":
                subscription.learn(line.get("rate_limit_info"))
            elif kind == "result":
                subscription.cost(line)
            yield line

    def _end(self) -> None:
        if self.process is not None:
            self.server.end_process(self.process, self.finished)
            self.note["cli"] = self.process.outcome()
            self.process = None
        if self.warm is not None:  # taken, and never given the request
            self.server.end_process(self.warm, False)
            self.warm = None


def parse_cli_line(line: Union[bytes, bytearray]) -> Optional[Dict[str, Any]]:
    """One stdout line as an event dict; blank or non-JSON lines (warnings) are skipped."""
    line = line.strip()
    if not line:
        return None
    try:  # decoded here: json.loads would first guess the encoding of bytes
        event = json.loads(line.decode("utf-8", "surrogatepass"))
    except (ValueError, RecursionError):
        log.debug("skipped a non-JSON line from the CLI (%d bytes)", len(line))
        return None
    return event if isinstance(event, dict) else None


##############################################################################
# The subscription: its windows, what was spent, the login (Subscription, Login)
##############################################################################

# On a claude.ai login the CLI prints a `rate_limit_event` line for each API answer, built from
# the API's anthropic-ratelimit-unified-* headers (2.1.331; none on an API key):
#   {"type": "rate_limit_event", "rate_limit_info": {"status": "allowed_warning",
#    "resetsAt": 1796520621, "rateLimitType": "five_hour", "utilization": 0.91,
#    "overageStatus": "allowed", "isUsingOverage": false, "surpassedThreshold": 0.9,
#    "unifiedWindows": {"five_hour": {"utilization": 0.91, "resetsAt": 1796520621,
#    "status": "allowed_warning", "surpassedThreshold": 0.9}, "seven_day": {...}}}, ...}
# "rejected" with isUsingOverage true is an answer that succeeded, billed as extra usage.

def number_or_none(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def string_or_none(value: Any) -> Optional[str]:
    return value if isinstance(value, str) and value else None


def usage_window(value: Any) -> Optional[Dict[str, Any]]:
    """One window of `unifiedWindows` as /v1/usage shows it; None when it holds nothing."""
    if not isinstance(value, dict):
        return None
    window: Dict[str, Any] = {}
    utilization, resets = number_or_none(value.get("utilization")), \
        number_or_none(value.get("resetsAt"))
    if utilization is not None:
        window["utilization"] = utilization
    if resets is not None:
        window["resets_at"] = int(resets)
    status, threshold = string_or_none(value.get("status")), \
        number_or_none(value.get("surpassedThreshold"))
    if status is not None:
        window["status"] = status
    if threshold is not None:
        window["surpassed_threshold"] = threshold
    return window or None


def local_time(when: float, now: float) -> str:
    """A reset time as a person reads it: 14:05 today, else Thu 09:00, with the time left."""
    moment, today = time.localtime(when), time.localtime(now)
    clock = time.strftime("%H:%M" if moment[:3] == today[:3] else "%a %H:%M", moment)
    return "%s (in %s)" % (clock, duration_words(when - now))


def duration_words(seconds: float) -> str:
    minutes = max(1, int(seconds + 59) // 60)
    if minutes < 60:
        return "%dm" % minutes
    if minutes < 48 * 60:
        return "%dh %02dm" % (minutes // 60, minutes % 60)
    return "%dd %dh" % (minutes // 1440, minutes % 1440 // 60)


class Subscription:
    """What the CLI reported of the subscription the proxy spends, and what it spent.

    Every request's CLI lines pass by (learn, spent); /v1/usage and the rate-limit headers read
    snapshots (status, headers); each new request asks refusal() first. The latest state is kept
    in `path` with the time it was learnt, so a restarted daemon knows it. A window whose reset
    time has passed counts as reset: its old utilization no longer applies.
    """

    def __init__(self, path: Optional[str], reserve: int, allow_extra_usage: bool):
        self.path, self.reserve, self.allow_extra_usage = path, reserve, allow_extra_usage
        self._lock = threading.Lock()
        self._saving = threading.Lock()
        self.since = int(time.time())  # what the totals count from
        self._state: Dict[str, Any] = {"windows": {}}  # as saved; see learn()
        self._totals = {"requests": 0, "input_tokens": 0, "output_tokens": 0,
                        "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        self._usd = 0.0
        if path:
            self._load(path)

    # -- what comes in -------------------------------------------------------

    def learn(self, info: Any, now: Optional[float] = None) -> None:
        """A rate_limit_event's `rate_limit_info`: each window it names replaces what was known
        of that window; the overall status, its type and the overage state are the latest."""
        if not isinstance(info, dict):
            return
        now = time.time() if now is None else now
        windows = info.get("unifiedWindows")
        with self._lock:
            state = dict(self._state, windows=dict(self._state["windows"]),
                         updated_at=int(now), status=string_or_none(info.get("status")),
                         claim=string_or_none(info.get("rateLimitType")),
                         resets_at=number_or_none(info.get("resetsAt")),
                         overage_status=string_or_none(info.get("overageStatus")) or
                         self._state.get("overage_status"),
                         overage_in_use=info.get("isUsingOverage") is True)
            for name, value in (windows.items() if isinstance(windows, dict) else ()):
                window = usage_window(value)
                if window is not None and isinstance(name, str):
                    state["windows"][name] = window
            claim = state["claim"]
            own = usage_window(info)  # a CLI without unifiedWindows: the claim's window
            if claim and claim not in state["windows"] and own:
                state["windows"][claim] = own
            newly_overage = state["overage_in_use"] and not self._in_overage(self._state, now)
            changed = {k: v for k, v in state.items() if k != "updated_at"} != {
                k: v for k, v in self._state.items() if k != "updated_at"}
            self._state = state
        if newly_overage:
            log.warning("the Claude subscription's %s limit is used up: requests are now billed "
                        "as extra usage; %s", WINDOW_NAMES.get(claim or "", claim or "plan"),
                        "--allow-extra-usage lets them go on" if not self.allow_extra_usage else
                        "they go on (--allow-extra-usage)")
        if changed and self.path:
            with self._saving:  # one writer at a time, and the last one writes the latest
                with self._lock:
                    state = self._state
                self._save(self.path, state)

    def spent(self, usage: Mapping[str, Any]) -> None:
        """An answered request: its tokens (the result's usage, as the client is told)."""
        with self._lock:
            self._totals["requests"] += 1
            for key in self._totals:
                value = usage.get(key)
                if key != "requests" and isinstance(value, int) and not isinstance(value, bool):
                    self._totals[key] += value

    def cost(self, result: Mapping[str, Any]) -> None:
        """A CLI result's total_cost_usd: what the same tokens would have cost on the API."""
        usd = number_or_none(result.get("total_cost_usd"))
        if usd is not None and usd > 0:
            with self._lock:
                self._usd += usd

    # -- what goes out -------------------------------------------------------

    def status(self, now: Optional[float] = None) -> Dict[str, Any]:
        """The body of /v1/usage but for `object` and `auth` (see ProxyServer.usage)."""
        now = time.time() if now is None else now
        with self._lock:
            state, totals, usd = self._state, dict(self._totals), self._usd
        windows = {name: self._window_now(window, now)
                   for name, window in state["windows"].items()}
        claim = state.get("claim")
        status = state.get("status")
        if status and claim in windows and windows[claim].get("reset"):
            status = "allowed"  # the window that set it has begun anew
        return {"updated_at": state.get("updated_at"), "status": status,
                "windows": windows,
                "overage": {"status": state.get("overage_status"),
                            "in_use": self._in_overage(state, now)},
                "totals": dict(totals, since=self.since, api_equivalent_usd=round(usd, 6)),
                "reserve_percent": self.reserve, "allow_extra_usage": self.allow_extra_usage}

    def headers(self, now: Optional[float] = None) -> List[Tuple[str, str]]:
        """The anthropic-ratelimit-unified-* headers the Anthropic API sends a subscription
        login, from the latest state (none before any): fractions and epoch seconds."""
        usage = self.status(now)
        if usage["updated_at"] is None:
            return []
        prefix = "anthropic-ratelimit-unified-"
        headers = [(prefix + "status", usage["status"])] if usage["status"] else []
        for name, short in RESERVED_WINDOWS.items():
            window = usage["windows"].get(name, {})
            for key, header in (("utilization", "utilization"), ("resets_at", "reset"),
                                ("status", "status")):
                value = window.get(key)
                if value is not None:
                    headers.append(("%s%s-%s" % (prefix, short, header), str(
                        round(value, 6) if key == "utilization" else value)))
        if usage["overage"]["status"]:
            headers.append((prefix + "overage-status", usage["overage"]["status"]))
            headers.append((prefix + "overage-in-use", "true" if usage["overage"]["in_use"]
                            else "false"))
        return headers

    def refusal(self, now: Optional[float] = None) -> Optional[APIError]:
        """The 429 a new request gets at once, without a CLI: the subscription is in extra usage
        (unless --allow-extra-usage), or a window is within the share --reserve keeps."""
        now = time.time() if now is None else now
        with self._lock:
            state = self._state
        if not self.allow_extra_usage and self._in_overage(state, now):
            resets = self._overage_ends(state)
            name = WINDOW_NAMES.get(state.get("claim") or "", "plan's")
            return APIError(
                429, "Your Claude subscription's %s limit is used up: further requests would be "
                "billed as extra usage, so claude-max-proxy refuses them until it resets at %s. "
                "Start the proxy with --allow-extra-usage (CLAUDE_MAX_API_ALLOW_EXTRA_USAGE=1) "
                "to let them through." % (name, local_time(resets, now)),
                type="rate_limit_error", code="extra_usage",
                retry_after=max(1, int(resets - now + 0.999)))
        if not self.reserve:
            return None
        for name in RESERVED_WINDOWS:
            window = self._window_now(state["windows"].get(name, {}), now)
            used, ends = window.get("utilization"), window.get("resets_at")
            if used is not None and ends is not None and used * 100 >= 100 - self.reserve:
                return APIError(
                    429, "claude-max-proxy keeps %d%% of your Claude subscription's %s window "
                    "for your own use (--reserve %d): it is at %d%% and resets at %s."
                    % (self.reserve, WINDOW_NAMES[name], self.reserve, int(used * 100),
                       local_time(ends, now)), type="rate_limit_error", code="usage_reserve",
                    retry_after=max(1, int(ends - now + 0.999)))
        return None

    # -- the state -----------------------------------------------------------

    @staticmethod
    def _window_now(window: Dict[str, Any], now: float) -> Dict[str, Any]:
        """A window as it stands now: once past its reset, begun anew (nothing used of it that
        is known, and no reset time until the CLI reports one)."""
        resets = window.get("resets_at")
        if resets is not None and resets <= now:
            return {"utilization": 0.0, "resets_at": None, "status": "allowed", "reset": True}
        return dict(window)

    @staticmethod
    def _overage_ends(state: Dict[str, Any]) -> float:
        claim = state.get("claim")
        window = state["windows"].get(claim or "", {})
        resets = window.get("resets_at") or state.get("resets_at")
        return float(resets if resets is not None else
                     (state.get("updated_at") or 0) + OVERAGE_FALLBACK_SECONDS)

    def _in_overage(self, state: Dict[str, Any], now: float) -> bool:
        """Whether the CLI's latest word is that answers go to extra usage, and the window
        that ran out has not reset since."""
        return bool(state.get("overage_in_use")) and self._overage_ends(state) > now

    def _load(self, path: str) -> None:
        """The state a daemon before this one saved; a damaged file is ignored."""
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.warning("ignored %s: %s", path, e)
            return
        if not isinstance(saved, dict) or not isinstance(saved.get("windows"), dict):
            return
        windows = {name: usage_window({"utilization": w.get("utilization"),
                                       "resetsAt": w.get("resets_at"), "status": w.get("status"),
                                       "surpassedThreshold": w.get("surpassed_threshold")})
                   for name, w in saved["windows"].items() if isinstance(w, dict)}
        updated = number_or_none(saved.get("updated_at"))
        self._state = {"windows": {k: v for k, v in windows.items() if v},
                       "updated_at": int(updated) if updated is not None else None,
                       "status": string_or_none(saved.get("status")),
                       "claim": string_or_none(saved.get("claim")),
                       "resets_at": number_or_none(saved.get("resets_at")),
                       "overage_status": string_or_none(saved.get("overage_status")),
                       "overage_in_use": saved.get("overage_in_use") is True}

    @staticmethod
    def _save(path: str, state: Dict[str, Any]) -> None:
        try:
            write_private(path, json.dumps(state, sort_keys=True) + "\n")
        except OSError as e:
            log.warning("could not keep the subscription's state in %s: %s", path, e)


class Login:
    """How the CLI is logged in, from `claude auth status --json`: asked at start and then at
    most once every LOGIN_CHECK_INTERVAL, in the background, so /health never waits on it."""

    def __init__(self, claude: ClaudeCLI):
        self.claude = claude
        self._lock = threading.Lock()
        self._known: Optional[Dict[str, Any]] = None  # {"logged_in", "method"}
        self._asked = -LOGIN_CHECK_INTERVAL  # monotonic time of the last check begun
        self._checking = False

    def status(self) -> Optional[Dict[str, Any]]:
        """The last answer (None before the first), and a new check if it is due."""
        with self._lock:
            due = not self._checking and time.monotonic() - self._asked >= LOGIN_CHECK_INTERVAL
            if due:
                self._checking, self._asked = True, time.monotonic()
            known = self._known
        if due:
            threading.Thread(target=self._check, name="login-check", daemon=True).start()
        return known

    def check(self) -> Optional[Dict[str, Any]]:
        """Ask now, and wait for the answer (at start)."""
        with self._lock:
            self._checking, self._asked = True, time.monotonic()
        self._check()
        return self._known

    def _check(self) -> None:
        known = None
        try:
            path = self.claude.status(wait=False)[0]
            if path:
                known = self._ask(path)
        finally:
            with self._lock:
                if known is not None or self._known is None:
                    self._known = known
                self._checking = False

    @staticmethod
    def _ask(path: str) -> Optional[Dict[str, Any]]:
        env = dict(os.environ)
        env.pop("CLAUDECODE", None)  # as for every run (Launch.environment)
        try:
            done = subprocess.run([path, "auth", "status", "--json"], stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=VERSION_TIMEOUT, env=env)
            answer = json.loads(done.stdout)
        except (OSError, subprocess.TimeoutExpired, ValueError) as e:
            log.debug("claude auth status: %s", e)
            return None
        if not isinstance(answer, dict) or not isinstance(answer.get("loggedIn"), bool):
            return None
        method = answer.get("authMethod")
        return {"logged_in": answer["loggedIn"],
                "method": method if isinstance(method, str) else None}


##############################################################################
# What a person sees: the `status` command and the status page (pure functions)
##############################################################################

BAR_WIDTH = 20  # characters of a window's bar in `status`: a line stays within 80 columns
STATUS_WORDS = {"allowed_warning": "warning", "rejected": "limit reached"}
ANSI = {"green": "\x1b[32m", "yellow": "\x1b[33m", "red": "\x1b[31m", "dim": "\x1b[2m",
        "bold": "\x1b[1m", "off": "\x1b[0m"}


def whole_percent(fraction: float) -> str:
    """0.91 -> "91%": whole numbers, never rounded up to a limit not reached."""
    return "%d%%" % int(fraction * 100 + 1e-6)


def token_count(count: int) -> str:
    """412, 9.5k, 310k, 1.2M: how many tokens, as a person reads it."""
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= size:
            value = count / size
            return ("%.1f%s" if value < 10 else "%d%s") % (value, unit)
    return str(count)


def usage_color(fraction: float) -> str:
    return "green" if fraction < 0.7 else "yellow" if fraction < 0.9 else "red"


def ordered_windows(windows: Mapping[str, Any]) -> List[Tuple[str, Dict[str, Any]]]:
    """The 5-hour window, the weekly one, then any other the CLI reported, by name."""
    known = [name for name in WINDOW_NAMES if name in windows]
    return [(name, windows[name]) for name in known + sorted(set(windows) - set(known))]


def login_words(claude: Mapping[str, Any]) -> str:
    if claude.get("logged_in") is True:
        return "logged in (%s)" % (claude.get("auth_method") or "unknown method")
    if claude.get("logged_in") is False:
        return "NOT logged in: run `claude auth login`"
    return "login not checked yet"


def unknown_usage_words(claude: Mapping[str, Any]) -> str:
    """Why nothing is known of the windows, in words (never zeros)."""
    if claude.get("auth_method") == "api_key":
        return "not reported: Claude Code uses an API key (billed per token), not a subscription"
    if claude.get("logged_in") is False:
        return "not known: Claude Code is not logged in"
    return "not known yet: no answer has reported it (a claude.ai login reports it with each)"


def extra_usage_words(usage: Mapping[str, Any]) -> str:
    overage = usage.get("overage") or {}
    proxy_allows = usage.get("allow_extra_usage")
    if overage.get("in_use"):
        return "IN USE: the plan's limit is used up; %s" % (
            "requests go on, billed as extra usage (--allow-extra-usage)" if proxy_allows else
            "requests are refused until it resets (--allow-extra-usage would let them through)")
    account = {"allowed": "allowed on the account", None: "not known for the account"}.get(
        overage.get("status"), "%s on the account" % overage.get("status"))
    return "%s; %s" % (account, "allowed by this proxy (--allow-extra-usage)" if proxy_allows
                       else "refused by this proxy (--allow-extra-usage)")


def totals_words(totals: Mapping[str, Any]) -> str:
    requests = totals.get("requests") or 0
    if not requests:
        return "no requests yet"
    read = totals.get("cache_read_input_tokens") or 0
    prompt = (totals.get("input_tokens") or 0) + read + \
        (totals.get("cache_creation_input_tokens") or 0)
    return "%d request%s · %s in / %s out tokens · %s read from cache · API value $%.2f" % (
        requests, "" if requests == 1 else "s", token_count(prompt),
        token_count(totals.get("output_tokens") or 0),
        whole_percent(read / prompt) if prompt else "0%", totals.get("api_equivalent_usd") or 0)


def window_words(window: Mapping[str, Any], now: float) -> Tuple[Optional[float], str]:
    """(the fraction used or None, the rest of its line: reset time and status)."""
    used = window.get("utilization")
    if window.get("reset"):
        return used, "reset since: a new window, nothing reported of it yet"
    resets = window.get("resets_at")
    words = "resets %s" % local_time(resets, now) if resets is not None else ""
    said = STATUS_WORDS.get(str(window.get("status")))
    return used, "  ".join(w for w in (words, said) if w)


class StatusRow(NamedTuple):
    """One line of `status` and one row of the page: a window (its bar, `used` None when the
    CLI did not say) or words."""
    label: str
    words: str
    window: bool = False
    used: Optional[float] = None


def status_rows(usage: Mapping[str, Any], claude: Mapping[str, Any],
                now: float) -> List[StatusRow]:
    """What `status` and the status page show of the subscription, in order: each window, or
    why none is known; extra usage; the reserve; the totals since start."""
    rows = []
    for name, window in ordered_windows(usage.get("windows") or {}):
        used, words = window_words(window, now)
        rows.append(StatusRow(WINDOW_NAMES.get(name, name.replace("_", " ")), words, True,
                              used))
    if not rows:
        rows.append(StatusRow("usage", unknown_usage_words(claude)))
    rows.append(StatusRow("extra usage", extra_usage_words(usage)))
    if usage.get("reserve_percent"):
        rows.append(StatusRow("reserve", "%d%% of each window kept for you (--reserve)"
                              % int(usage["reserve_percent"])))
    rows.append(StatusRow("since start", totals_words(usage.get("totals") or {})))
    return rows


def status_text(usage: Mapping[str, Any], health: Mapping[str, Any], where: str, now: float,
                color: bool) -> str:
    """What `status` prints: one screen, at most 80 columns; with `color` (a terminal without
    NO_COLOR) bars of blocks in colour, else plain text with bars of # and -."""
    def paint(text: str, name: str) -> str:
        return "%s%s%s" % (ANSI[name], text, ANSI["off"]) if color else text

    claude = health.get("claude") or {}
    uptime = health.get("uptime_seconds")
    head = ["claude-max-proxy on %s" % where, login_words(claude)]
    if uptime is not None:
        head.append("up %s" % duration_words(float(uptime)))
    if health.get("status") not in ("ok", "not_logged_in", None):
        head.append(str(health.get("status")))
    lines = [" · ".join(head)]
    rows = status_rows(usage, claude, now)
    width = max([len(row.label) for row in rows if row.window] + [6]) + 2
    for row in rows:
        if not row.window:
            lines.append("%s  %s" % (row.label, row.words))
        elif row.used is None:
            lines.append("%s%s  %s" % (row.label.ljust(width), "not reported", row.words))
        else:
            filled = min(BAR_WIDTH, int(round(row.used * BAR_WIDTH)))
            bar = paint("█" * filled, usage_color(row.used)) + \
                paint("░" * (BAR_WIDTH - filled), "dim") if color else \
                "[%s%s]" % ("#" * filled, "-" * (BAR_WIDTH - filled))
            lines.append("%s%s %4s  %s" % (row.label.ljust(width), bar,
                                           whole_percent(row.used), row.words))
    return "\n".join(line.rstrip() for line in lines) + "\n"


def status_page(usage: Mapping[str, Any], health: Mapping[str, Any], requests:
                List[Dict[str, Any]], where: str, now: float) -> str:
    """The page at GET / for a browser: the same as `status`, and the last requests. One
    document: inline CSS, no script, font, image or link, readable without JavaScript; it asks
    to be reloaded every 30 s. Every value from outside is escaped."""
    e = html.escape
    claude = health.get("claude") or {}
    rows = []
    for row in status_rows(usage, claude, now):
        if not row.window:
            rows.append('<tr><th>%s</th><td colspan="3">%s</td></tr>' % (e(row.label),
                                                                          e(row.words)))
            continue
        used = row.used
        width = 0 if used is None else max(0, min(100, int(round(used * 100))))
        rows.append('<tr><th>%s</th><td><div class="bar"><div class="%s" style="width:%d%%">'
                    '</div></div></td><td class="num">%s</td><td>%s</td></tr>' % (
                        e(row.label), usage_color(used or 0), width,
                        whole_percent(used) if used is not None else "?", e(row.words)))
    log_rows = []
    for r in reversed(requests):
        log_rows.append(
            "<tr><td>%s</td><td>%s</td><td>%s</td><td class=num>%.2f s</td><td class=num>%s</td>"
            "<td class=num>%s</td><td class=num>%s</td><td>%s</td></tr>" % (
                e(time.strftime("%H:%M:%S", time.localtime(r["at"]))), e(str(r["dialect"])),
                e(str(r["model"] or "")), r["seconds"], e(token_count(r["input_tokens"])),
                e(token_count(r["output_tokens"])), e(whole_percent(r["cache_read"])
                                                     if r["cache_read"] is not None else ""),
                e("%s %s" % (r["status"], r["error"] or "") if r["error"] else
                  str(r["status"]))))
    uptime = health.get("uptime_seconds")
    return """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="30">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>claude-max-proxy</title>
<style>
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:60em;
padding:0 1em;color:#1d1d1f;background:#fff}
h1{font-size:1.3em}h2{font-size:1.05em;margin-top:2em}p.head{color:#555}
table{border-collapse:collapse;width:100%%}th,td{text-align:left;padding:.3em .6em;
border-bottom:1px solid #e5e5e5;vertical-align:middle}th{white-space:nowrap;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.bar{background:#eee;border-radius:4px;height:.9em;width:14em}.bar div{height:100%%;border-radius:4px}
.green{background:#34a853}.yellow{background:#f5b400}.red{background:#d93025}
@media (prefers-color-scheme:dark){body{background:#111;color:#eee}th,td{border-color:#333}
.bar{background:#333}p.head{color:#aaa}}
</style></head><body>
<h1>claude-max-proxy</h1>
<p class="head">%s · %s%s · page of %s, reloaded every 30 s</p>
<table class="usage">%s</table>
<h2>Last requests</h2>
<table class="requests"><tr><th>time</th><th>dialect</th><th>model</th><th>took</th>
<th>in</th><th>out</th><th>cache read</th><th>status</th></tr>
%s</table>
</body></html>
""" % (e(where), e(login_words(claude)),
       " · up %s" % e(duration_words(float(uptime))) if uptime is not None else "",
       e(time.strftime("%H:%M:%S", time.localtime(now))), "\n".join(rows),
       "\n".join(log_rows) or '<tr><td colspan="8">none yet</td></tr>')


# Nothing on the status page may load or run anything, nor be framed by another site, nor be
# kept by a cache.
PAGE_HEADERS = (("Cache-Control", "no-store"),
                ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; "
                 "frame-ancestors 'none'; form-action 'none'"),
                ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"))


class RequestLog:
    """The last requests' figures for the status page, in the order they came (`at`, the time
    each began): a bounded ring in memory, holding no prompt or answer text. A request is added
    when it ends, which is not the order they came: one answered on one connection can be added
    after the next one a client sent on another, and a long stream after many short ones."""

    def __init__(self, size: int = 50):
        self._lock = threading.Lock()
        self._size = size
        self._entries: List[Dict[str, Any]] = []

    def add(self, entry: Dict[str, Any]) -> None:
        with self._lock:
            place = len(self._entries)
            while place and self._entries[place - 1]["at"] > entry["at"]:
                place -= 1
            self._entries.insert(place, entry)
            del self._entries[:-self._size]

    def entries(self) -> List[Dict[str, Any]]:
        with self._lock:
            return list(self._entries)


##############################################################################
# HTTP: ProxyServer, StrictHTTPHandler, ProxyHandler
##############################################################################

def host_port(host: str, port: int) -> str:
    """An address as a URL names it: 127.0.0.1:3456, [::1]:3456."""
    return "%s:%d" % ("[%s]" % host if ":" in host else host, port)


def _reject_constant(name: str) -> Any:
    raise ValueError("%s is not valid JSON" % name)


# A surrogate code point, raw (UTF-8 bytes ED A0 80 to ED BF BF, decoded with surrogatepass) or
# as a \uD800-\uDFFF escape: valid only as an escaped high-low pair, which json joins.
SURROGATE = re.compile(r"[\ud800-\udfff]|\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def parse_json_body(raw: Union[bytes, bytearray]) -> Any:
    """A request body as JSON: UTF-8 only (RFC 8259, section 8.1; a UTF-8 byte order mark is
    ignored), no NaN or Infinity, and no unpaired surrogate, which no text can hold (the CLI's
    stdin and files are UTF-8): the field that holds one is named."""
    if raw[:3] == b"\xef\xbb\xbf":
        raw = raw[3:]
    if json.detect_encoding(raw) != "utf-8":  # by its byte order mark or its zero bytes
        raise invalid("", "The request body must be JSON encoded as UTF-8 (RFC 8259, section "
                          "8.1), not UTF-16 or UTF-32.")
    try:
        text = raw.decode("utf-8", "surrogatepass")  # raw surrogates: named below, by field
        body = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise invalid("", "The request body is nested too deeply.") from None
    except UnicodeError:
        raise invalid("", "The request body is not valid UTF-8.") from None
    except ValueError as e:
        raise invalid("", "The request body is not valid JSON: %s" % e) from None
    if SURROGATE.search(text):
        field = surrogate_field(body, "")
        if field is not None:
            raise invalid(field, "%s holds an unpaired surrogate (U+D800 to U+DFFF, raw or as a "
                          "\\u escape), which is not text: send valid UTF-8."
                          % ("`%s`" % field if field else "The request body"))
    return body


def surrogate_field(value: Any, where: str) -> Optional[str]:
    """The path of the first string (or key) in `value` with an unpaired surrogate, or None."""
    stack = [(value, where)]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if LONE_SURROGATE.search(value):
                return where
        elif isinstance(value, dict):
            for key, item in reversed(list(value.items())):
                field = "%s.%s" % (where, key) if where else key
                if LONE_SURROGATE.search(key):
                    return field.encode("utf-8", "backslashreplace").decode("ascii")
                stack.append((item, field))
        elif isinstance(value, list):
            stack.extend(("%s[%d]" % (where, i), item)[::-1] for i, item in
                         reversed(list(enumerate(value))))
    return None


class ProxyServer(ThreadingHTTPServer):
    """The listening socket, the settings, who may use it, and the CLI processes alive now."""

    daemon_threads = True  # a hung client must not keep the daemon from exiting
    # Keep no list of request threads to join at close: some 3.7-3.9 releases grew that list
    # for as long as the server ran (https://bugs.python.org/issue37193).
    block_on_close = False
    request_queue_size = 64  # connections the kernel holds while the accept loop is busy

    def __init__(self, address: Tuple[str, int], settings: argparse.Namespace):
        self.settings = settings
        self.claude = ClaudeCLI(settings.claude_bin)
        self.up_since = time.time()
        self.access = Access(address[0], settings.allowed_hosts, settings.cors_origins,
                             settings.api_keys)
        self.slots = ProcessSlots(settings.max_concurrency, settings.max_queue)
        self.dialects = {dialect.path: dialect() for dialect in DIALECTS}
        self.changed = threading.Condition()  # guards the fields below; notified on changes
        self.processes: "set[ClaudeProcess]" = set()
        self.processes_started = 0
        self.chats = 0  # chat requests being served, waiting for a slot included
        self.quiet_since = 0.0  # when the last of them ended (monotonic)
        self.connections = 0
        self.stopping = threading.Event()
        self.hurry = threading.Event()  # a second signal: end everything without grace
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, ProxyHandler)
        self.workdir = make_workdir()  # once bound: a port in use leaves nothing behind
        shared: Optional[str]
        try:
            shared = shared_dir()
            self.cwd = os.path.join(shared, "cwd")
        except OSError as e:
            log.warning("%s: the CLI works in a directory of this daemon's instead, so the "
                        "prompt cache does not carry conversations across a restart", e)
            shared, self.cwd = None, os.path.join(self.workdir, "cwd")
            os.mkdir(self.cwd, 0o700)
        self.sessions = Sessions(self.cwd, shared, self.workdir, settings.history == "turns")
        self.subscription = Subscription(os.path.join(shared or self.workdir, USAGE_FILE),
                                         settings.reserve, settings.allow_extra_usage)
        self.login = Login(self.claude)
        self.requests = RequestLog(REQUEST_LOG_SIZE)  # the status page's last requests
        self.warm = WarmPool(self, min(settings.warm, settings.max_concurrency),
                             settings.warm_idle)

    def health(self, full: bool) -> Dict[str, Any]:
        """/health: whether it can answer, and what with. Not `full` (a caller without the key,
        when keys are set): without where the CLI is installed, which names the user."""
        path, version, problem = self.claude.status(wait=False)
        healthy = bool(path) and not self.stopping.is_set()
        body: Dict[str, Any] = {
            "status": "ok" if healthy else "stopping" if path else "unavailable",
            "version": __version__,
            "claude": {"path": path, "version": version},
            "uptime_seconds": round(time.time() - self.up_since, 1),
            "requests_in_flight": len(self.processes) - self.warm.ready,
            "requests_waiting": self.slots.queued,
            "history": "transcript" if self.settings.history != "turns" or
                       self.sessions.refused else "turns",
            "max_concurrency": self.slots.limit,
            "warm": self.warm.status()}
        if not path:
            body["reason"] = problem
        login = self.login.status()
        body["claude"].update(logged_in=login["logged_in"] if login else None,
                              auth_method=login["method"] if login else None)
        if healthy and login and not login["logged_in"]:
            body["status"] = "not_logged_in"
            body["reason"] = ("Claude Code is not logged in: run `claude auth login` (or `claude` "
                              "and /login) as the user this daemon runs as.")
        elif login and login["method"] == "api_key":
            body["warning"] = ("Claude Code uses an API key (ANTHROPIC_API_KEY or an "
                               "apiKeyHelper): requests are billed per token to that API "
                               "account, not to your subscription.")
        if not full:
            del body["claude"]["path"]
            body.pop("reason", None)
        return body

    def usage(self) -> Dict[str, Any]:
        """/v1/usage: the subscription's windows, what was spent since start, the login."""
        login = self.login.status()
        return {"object": "usage", "auth": {
            "logged_in": login["logged_in"] if login else None,
            "method": login["method"] if login else None}, **self.subscription.status()}

    def process_request(self, request: Any, client_address: Any) -> None:
        """One thread per connection, up to MAX_CONNECTIONS; past it a 503 and the door."""
        with self.changed:
            full = self.connections >= MAX_CONNECTIONS
            if not full:
                self.connections += 1
        if full:
            log.warning("refused a connection from %s: %d connections are open",
                        client_address[0], MAX_CONNECTIONS)
            body = json.dumps(APIError(503, "Too many open connections.", type="server_error",
                                       code="too_many_connections").body()).encode()
            try:
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                                b"application/json\r\nContent-Length: %d\r\nConnection: close"
                                b"\r\nRetry-After: %d\r\n\r\n%s"
                                % (len(body), QUEUE_RETRY_AFTER, body))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connection_closed()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connection_closed()

    def _connection_closed(self) -> None:
        with self.changed:
            self.connections -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Client hang-ups are normal here; anything else is a bug and keeps its traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError, socket.timeout)):
            log.debug("client %s went away: %s", client_address[0], error)
            return
        log.exception("error while serving a request from %s", client_address[0])

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Around a request that runs the CLI, its answer written included: a shutdown waits
        for these (finish_requests), and refuses new ones once it began; warm CLIs start only
        when none is in flight (quiet_for)."""
        with self.changed:
            self.chats += 1
        try:
            yield
        finally:
            with self.changed:
                self.chats -= 1
                self.quiet_since = time.monotonic()
                self.changed.notify_all()
                quiet = not self.chats
            if quiet:
                self.warm.wake()

    def quiet_for(self) -> Optional[float]:
        """Seconds since the last request in flight ended; None while one is."""
        with self.changed:
            return None if self.chats else time.monotonic() - self.quiet_since

    def launch(self, request: Request) -> Launch:
        """How `request` runs: the CLI, and a session for its conversation (Sessions.plan)."""
        claude = self.claude.require()
        version = self.claude.status(wait=False)[1]
        return self.sessions.plan(Launch(claude, request, self.settings.user_settings), version)

    def start_process(self, launch: Launch, warm: bool = False) -> "ClaudeProcess":
        """A CLI process for `launch`: given its stdin now, or, `warm`, waiting for begin()."""
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.cwd, 0o700)  # a temp-dir cleaner may have removed it meanwhile
        try:
            session = self.sessions.open(launch)
        except OSError as e:  # a full disk, say: this request goes as a transcript
            log.warning("could not write a session file for a conversation: %s", e)
            launch, session = launch._replace(session=None), None
        try:
            process = ClaudeProcess(
                lambda paths: launch.argv(dict(paths, session=session) if session else paths),
                None if warm else launch.stdin(), launch.environment(dict(os.environ)),
                launch.files(), self.workdir, self.cwd)
        except BaseException:
            if session:
                self.sessions.close(launch, session)
            raise
        process.session, process.launch = session, launch
        with self.changed:
            if launch.resumed is not None and not warm:
                self.sessions.resumed += 1
            process.peers_at_start = len(self.processes)
            self.processes_started += 1
            process.sequence = self.processes_started
            self.processes.add(process)
        return process

    def begun(self, process: "ClaudeProcess", launch: Launch) -> None:
        """A warm process was given `launch`'s request."""
        process.launch = launch
        if launch.resumed is not None:
            with self.changed:
                self.sessions.resumed += 1

    def overlapped(self, process: "ClaudeProcess") -> bool:
        """Whether another CLI ran while `process` started or started after it: one of them
        may have been refreshing the subscription's login token at the time."""
        with self.changed:
            return process.peers_at_start > 0 or self.processes_started > process.sequence

    def end_process(self, process: "ClaudeProcess", finished: bool) -> Optional[int]:
        try:
            return process.close(finished=finished)
        finally:
            if process.session and process.launch:
                self.sessions.close(process.launch, process.session, finished)
            if process.launch and process.launch.request.tools:
                # The CLI's log of its connection to the bridge: one file per run, else kept
                # for a month. The folder is the working directory's, the daemons' own.
                shutil.rmtree(self.sessions.logs(), ignore_errors=True)
            with self.changed:
                self.processes.discard(process)
                self.changed.notify_all()

    def end_all_processes(self, grace: float = KILL_GRACE) -> None:
        """Ask every CLI to stop, give their requests a moment to end, then kill the rest."""
        with self.changed:
            for process in self.processes:
                process.signal(signal.SIGTERM)
            self.changed.wait_for(lambda: not self.processes, timeout=grace)
            for process in self.processes:
                process.signal(signal.SIGKILL)

    def stop_accepting(self) -> None:
        """The first step of a shutdown: no new CLI runs, no new connections."""
        self.stopping.set()
        self.slots.close()  # and so no new warm process either
        self.shutdown()  # serve_forever returns; main() then closes the socket

    def finish_requests(self, grace: float) -> None:
        """At shutdown, once no connection is accepted any more: requests waiting for a slot
        are refused, those with a CLI get `grace` seconds to finish (unless `hurry` is set),
        then every CLI process group is ended and their clients are told so."""
        self.stopping.set()
        self.slots.close()
        self.warm.close()
        with self.changed:
            busy = self.chats
            if busy:
                log.info("waiting up to %g s for %d request(s) to finish", grace, busy)
            self.changed.wait_for(lambda: not self.chats or self.hurry.is_set(), timeout=grace)
        self.end_all_processes()
        with self.changed:  # let their handlers write the error to the clients
            self.changed.wait_for(lambda: not self.chats, timeout=KILL_GRACE)
        self.remove_workdir()

    def server_close(self) -> None:
        """No new connections, and no warm process any more."""
        if hasattr(self, "warm"):  # not when binding failed: the pool comes after it
            self.warm.close()
        super().server_close()

    def remove_workdir(self) -> None:
        """Last, once no CLI runs: the private directory of make_workdir() goes."""
        shutil.rmtree(self.workdir, ignore_errors=True)

    def hurry_up(self) -> None:
        self.hurry.set()
        with self.changed:
            self.changed.notify_all()


HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a token (RFC 9110, 5.1)


class Route(NamedTuple):
    methods: Tuple[str, ...]
    handler: Callable[[], None]
    dialect: Optional[Dialect] = None  # whose error shape the path's errors take
    public: bool = False  # answered without the API key too (/health, which then says less)
    page: bool = False  # a page for a browser: its key may come by HTTP Basic auth
    # Its answers carry the subscription's anthropic-ratelimit-unified-* headers.
    rate_limits: bool = False


class StrictHTTPHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 framing that leaves nothing ambiguous: deadlines for slow clients, refused
    request lines and header blocks that http.server would misread, JSON bodies read only
    within --max-body and --client-timeout, errors as JSON, chunked writes for streams."""

    protocol_version = "HTTP/1.1"  # keep-alive and chunked streaming
    # TCP_NODELAY: a stream's chunks go out as they are written. With Nagle's algorithm a chunk
    # could wait for the ACK of the one before, which the client delays by up to 40 ms.
    disable_nagle_algorithm = True
    server_version = "claude-max-proxy/" + __version__
    # Errors on a request line too short to carry a version still get a status line.
    default_request_version = "HTTP/1.0"
    server: ProxyServer
    _cors_origin: Optional[str] = None  # the request's Origin, when it is an allowed one
    _linger = False  # a request body was left unread: drop it before closing (see finish)
    _request_id = "-"


    def setup(self) -> None:
        super().setup()
        # Seconds a client may stay silent while it sends a request (or while it should be
        # reading the answer); then it is dropped. Idle keep-alive connections end after it too.
        self.connection.settimeout(self.server.settings.client_timeout)

    def finish(self) -> None:
        super().finish()
        if not self._linger:
            return
        try:
            self.connection.shutdown(socket.SHUT_WR)  # the answer is complete: FIN after it
            deadline, dropped = time.monotonic() + LINGER_SECONDS, 0
            while dropped < LINGER_BYTES and time.monotonic() < deadline:
                self.connection.settimeout(max(0.01, deadline - time.monotonic()))
                data = self.connection.recv(READ_CHUNK)
                if not data:
                    break
                dropped += len(data)
        except OSError:
            pass

    def version_string(self) -> str:
        return self.server_version  # not Python's version: no need to tell every client

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        pass  # one line per request is written by _dispatch, with model, tokens and timing

    def log_message(self, format: str, *args: Any) -> None:
        # BaseHTTPRequestHandler's own messages (bad request lines, timeouts): the request line
        # is client data, so control characters are escaped as http.server does.
        log.debug("%s %s", self.address_string(), (format % args).translate(self._control_table))

    _control_table = {c: r"\x%02x" % c for c in list(range(0x20)) + list(range(0x7f, 0xa0))}

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if len(self.requestline.split()) < 3 or self.request_version < "HTTP/1.0":
            self.request_version = "HTTP/1.0"  # so that the error has a status line
            self.send_error(400, "HTTP/0.9 requests are not served; send HTTP/1.1.")
            return False
        # The email parser behind self.headers drops a line with no name and takes a line
        # that is no header for the start of a body, with every header after it: both are
        # refused, as are folded lines (obs-fold, which RFC 9112 lets a server refuse).
        if any(isinstance(defect, (email.errors.MissingHeaderBodySeparatorDefect,
                                   email.errors.InvalidHeaderDefect))
               for defect in self.headers.defects) or any(
                not HEADER_NAME.fullmatch(name) or "\n" in value
                for name, value in self.headers.items()):
            self.send_error(400, "Malformed header lines.")
            return False
        if not hasattr(self, "do_" + self.command):  # BREW, PROPFIND...: a 405 with Allow
            self.handle_unknown_method()
            return False
        return True

    def handle_unknown_method(self) -> None:
        self.send_error(405)

    def handle_expect_100(self) -> bool:
        # `Expect: 100-continue` is answered only once the request has passed every check,
        # just before its body is read (_read_json): a refused one never sends its body.
        return True

    def send_response(self, code: int, message: Optional[str] = None) -> None:
        self._status = code
        super().send_response(code, message)

    def send_error(self, code: int, message: Optional[str] = None,
                   explain: Optional[str] = None) -> None:
        """http.server's own errors (malformed request line, headers too long) as JSON."""
        self.close_connection = True
        text = message or HTTPStatus(code).phrase
        self._send_json(code, APIError(code, text).body())

    def end_headers(self) -> None:
        if self._body_unread():
            self.close_connection = True  # left unread, it would be taken for the next request
            self._linger = True
        if self.close_connection:
            self.send_header("Connection", "close")
        origin = getattr(self, "_cors_origin", None)
        if origin:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Access-Control-Expose-Headers", "Retry-After, X-Request-Id")
        if self.server.access.cors_origins:
            self.send_header("Vary", "Origin")
        super().end_headers()

    def _body_unread(self) -> bool:
        headers = getattr(self, "headers", None)
        if headers is None or getattr(self, "_body_read", True):
            return False
        return bool(headers.get("Transfer-Encoding")
                    or headers.get("Content-Length", "0").strip() not in ("", "0"))

    def _send_json(self, status: int, body: Any, headers: Iterable[Tuple[str, str]] = ()) -> None:
        self._send(status, "application/json", json.dumps(body, ensure_ascii=False).encode(),
                   headers)

    def _send(self, status: int, content_type: str, data: bytes,
              headers: Iterable[Tuple[str, str]] = ()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Request-Id", self._request_id)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


    def _read_json(self) -> Any:
        """The request body as JSON: application/json, a Content-Length within --max-body, and
        all of it within --client-timeout. Anything else is refused before it is read."""
        try:
            return parse_json_body(self._read_body())
        except APIError:
            self.close_connection = True  # where a body that was not read ends is unknown
            raise

    def _read_body(self) -> bytearray:
        content_type = self.headers.get("Content-Type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise APIError(415, "POST bodies must be sent with Content-Type: application/json.",
                           code="unsupported_media_type")
        if self.headers.get("Transfer-Encoding"):
            raise APIError(411, "Chunked request bodies are not supported; send Content-Length.",
                           code="length_required")
        lengths = self.headers.get_all("Content-Length") or []
        if len(lengths) > 1:
            raise APIError(400, "Send one Content-Length header, not %d." % len(lengths),
                           code="invalid_content_length")
        length = lengths[0].strip() if lengths else None
        if length is None:
            raise APIError(411, "A Content-Length header is required.", code="length_required")
        if not (length.isdigit() and length.isascii()):
            raise APIError(400, "Content-Length must be a number of bytes.",
                           code="invalid_content_length")
        size, limit = int(length), self.server.settings.max_body
        if size > limit:
            raise APIError(413, "The request body (%d bytes) is larger than the %d bytes this "
                           "proxy accepts (--max-body)." % (size, limit), code="request_too_large")
        if (self.headers.get("Expect", "").strip().lower() == "100-continue"
                and self.request_version != "HTTP/1.0"):  # RFC 9110: ignored in HTTP/1.0
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        raw = bytearray()
        deadline = time.monotonic() + self.server.settings.client_timeout
        try:
            while len(raw) < size:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout()
                self.connection.settimeout(left)
                data = self.rfile.read1(min(size - len(raw), READ_CHUNK))
                if not data:
                    raise APIError(400, "The request body ended early.")
                raw += data
        except socket.timeout:
            raise APIError(408, "The request body did not arrive within %g s."
                           % self.server.settings.client_timeout, code="request_timeout") from None
        finally:
            self.connection.settimeout(self.server.settings.client_timeout)
        self._body_read = True
        return raw  # json.loads takes a bytearray: no copy of a body of up to --max-body

    def _write_chunk(self, data: bytes) -> None:
        """One HTTP/1.1 chunk (the empty one ends the body), sent at once."""
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except (ConnectionError, TimeoutError, socket.timeout) as e:
            raise ClientDisconnected() from e

    def _send_error(self, error: APIError) -> None:
        self._send_json(error.status, error.body(), error.headers.items())


class ProxyHandler(StrictHTTPHandler):
    """Checks who is asking, routes each path to its endpoint, and answers any dialect's
    request with a CLI run, streamed or whole."""

    _dialect: Optional[Dialect] = None
    _rate_limits = False  # the route's answers carry the subscription's headers

    def end_headers(self) -> None:
        if self._rate_limits and self._authorized:
            for name, value in self.server.subscription.headers():
                self.send_header(name, value)
        super().end_headers()

    # -- who may ask ---------------------------------------------------------

    def _check_access(self, public: bool, page: bool = False) -> None:
        """Refuse browsers from other sites, unknown Host names, and callers without a key
        (see Access)."""
        self._cors_origin, self._authorized = self.server.access.check(
            self.headers, self.request_version == "HTTP/1.0", page)
        if not self._authorized and self.command != "OPTIONS" and not public:
            raise Access.refusal(self.headers, page)

    # -- routing -------------------------------------------------------------

    def _dispatch(self) -> None:
        self._status = 0
        hex_id = uuid.uuid4().hex[:24]
        self._note: Dict[str, Any] = {}
        self._usage_counts: Optional[Dict[str, Any]] = None  # the answer's, as OpenAI counts
        self._error_code: Optional[str] = None
        self._asked_model: Optional[str] = None
        self._gathered = bytearray()  # a stream's events not sent yet (_send_gathered)
        self._cors_origin = None
        self._body_read = False
        self._authorized = False
        begun = time.monotonic()
        path = self.path.split("?", 1)[0]  # as the client sent it: what the log and errors quote
        route = self._route(path[3:] if path.startswith("/v1/") else path)
        self._dialect = route.dialect if route else None  # errors come in its shape
        self._rate_limits = route is not None and route.rate_limits
        self._request_id = (self._dialect.id_prefix if self._dialect else "req_") + hex_id
        try:
            try:
                self._check_access(route is not None and route.public,
                                   route is not None and route.page)
                if route is None:
                    raise self._unknown(path)
                if self.command == "OPTIONS":
                    self._options(route.methods)
                elif self.command not in route.methods:
                    raise APIError(405, "%s is not allowed on %s." % (self.command, path[:200]),
                                   code="method_not_allowed",
                                   headers={"Allow": ", ".join(route.methods + ("OPTIONS",))})
                else:
                    route.handler()
            except APIError as error:
                self._send_error(error)
        except ClientDisconnected:
            self.close_connection = True
            self._status = self._status or 499  # nginx's "client closed request"
        except (ConnectionError, TimeoutError, socket.timeout):
            self.close_connection = True  # the client hung up while we wrote: not our fault
            self._status = self._status or 499
        except Exception:  # a bug: its traceback goes to the log, and the client still hears
            log.exception("error while serving %s %s", self.command,
                          path.translate(self._control_table)[:200])
            self.close_connection = True
            if not self._status:  # nothing was sent yet
                with contextlib.suppress(OSError):
                    self._send_error(APIError(500, "claude-max-proxy failed on this request; "
                                              "its log has the details.", type="server_error",
                                              code="internal_error"))
            self._status = self._status or 500
        finally:
            if route is not None and route.rate_limits and route.dialect is not None:
                self.server.requests.add(self._log_entry(route.dialect, begun))
            note = "".join(" %s=%s" % item for item in self._note.items())
            log.info("%s %s %s %.2fs%s id=%s", self.command, path.translate(
                self._control_table)[:200], self._status, time.monotonic() - begun, note,
                self._request_id)

    def _log_entry(self, dialect: Dialect, begun: float) -> Dict[str, Any]:
        """A request's figures for the status page: no prompt or answer text."""
        counts = self._usage_counts or {}
        prompt = counts.get("prompt_tokens") or 0
        cached = (counts.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        return {"at": time.time() - (time.monotonic() - begun),  # when it came
                "dialect": dialect.path.strip("/").split("/")[0],
                "model": self._note.get("model") or self._asked_model,
                "seconds": time.monotonic() - begun,
                "input_tokens": prompt, "output_tokens": counts.get("completion_tokens") or 0,
                "cache_read": cached / prompt if prompt else None,
                "status": self._status or 499, "error": self._error_code}

    def _unknown(self, path: str) -> APIError:
        return APIError(404, "Unknown path %r. This proxy serves %s, /v1/models, /v1/usage and "
                        "/health, and a status page at / for a browser." % (path[:200], ", ".join(
                            "/v1%s (%s)" % (d.path, d.name)
                            for d in self.server.dialects.values())), code="unknown_url")

    # The usual methods all go through _dispatch, so a wrong one gets a JSON 405 with Allow.
    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch
    handle_unknown_method = _dispatch

    def _route(self, path: str) -> Optional[Route]:
        """The methods, handler and dialect of a path under /v1; None when there is none."""
        read = ("GET", "HEAD")
        dialects = self.server.dialects
        if path == "/":
            return Route(read, self._page, page=True)
        if path == "/health":
            return Route(read, self._health, public=True)
        if path == "/models":
            return Route(read, self._models)
        if path == "/usage":
            return Route(read, self._usage, rate_limits=True)
        if path.startswith("/models/"):
            return Route(read, lambda: self._model(path[len("/models/"):]))
        if path == "/messages/count_tokens":
            return Route(("POST",), self._count_tokens, dialects["/messages"])
        if path in dialects:
            return Route(("POST",), lambda: self._answer(dialects[path]), dialects[path],
                         rate_limits=True)
        return None

    def _options(self, allowed: Tuple[str, ...]) -> None:
        """OPTIONS: the methods of a path, and for an allowed origin a CORS preflight answer."""
        self.send_response(204)
        self.send_header("Allow", ", ".join(allowed + ("OPTIONS",)))
        if self._cors_origin and self.headers.get("Access-Control-Request-Method"):
            self.send_header("Access-Control-Allow-Methods", ", ".join(allowed))
            # The origin is trusted, so whatever headers its client sends (the OpenAI JS SDK
            # sends several x-stainless-* ones) are allowed, if they are header names at all.
            asked = self.headers.get("Access-Control-Request-Headers", "").strip()
            if re.fullmatch(r"[!#$%&'*+.^_`|~\w-]+(?:\s*,\s*[!#$%&'*+.^_`|~\w-]+)*", asked,
                            re.ASCII):
                self.send_header("Access-Control-Allow-Headers", asked)
            self.send_header("Access-Control-Max-Age", "600")
            # Chrome's Private Network Access: a public page asking for a loopback address.
            if self.headers.get("Access-Control-Request-Private-Network", "").lower() == "true":
                self.send_header("Access-Control-Allow-Private-Network", "true")
        self.send_header("Content-Length", "0")
        self.send_header("X-Request-Id", self._request_id)
        self.end_headers()

    # -- endpoints -----------------------------------------------------------

    def _health(self) -> None:
        """Never waits behind chat requests. Without a valid key (when keys are set) it leaves
        out where the CLI is installed, which names the user."""
        body = self.server.health(self._authorized)
        self._send_json(200 if body["status"] in ("ok", "not_logged_in") else 503, body)

    def _usage(self) -> None:
        """What the subscription's windows stand at, as the CLI last reported them, what the
        proxy spent since it started, and the login (see Subscription)."""
        self._send_json(200, self.server.usage())

    def _page(self) -> None:
        """For a browser (it asks for text/html): the status page. Anyone else gets what they
        got before there was one, a 404."""
        if "text/html" not in self.headers.get("Accept", "").lower():
            raise self._unknown(self.path.split("?", 1)[0])
        server = self.server
        page = status_page(server.usage(), server.health(self._authorized),
                           server.requests.entries(),
                           host_port(str(server.server_address[0]), server.server_address[1]),
                           time.time())
        self._send(200, "text/html; charset=utf-8", page.encode("utf-8"), PAGE_HEADERS)

    def _anthropic(self) -> bool:
        """Anthropic's SDKs and Claude Code send this header; OpenAI's do not."""
        return self.headers.get("anthropic-version") is not None

    def _models(self) -> None:
        self._send_json(200, anthropic_model_list() if self._anthropic() else model_list())

    def _model(self, quoted_name: str) -> None:
        model, _ = resolve_model(unquote(quoted_name))
        self._send_json(200, anthropic_model(model) if self._anthropic() else model_object(model))

    def _count_tokens(self) -> None:
        """An estimate (see estimate_tokens): the CLI has no way to ask the API's own count."""
        request = self.server.dialects["/messages"].parse(self._read_json())
        self._send_json(200, {"input_tokens": estimate_tokens(request)})

    def _answer(self, dialect: Dialect) -> None:
        """Any dialect's request: parsed, answered by one CLI run, streamed or whole."""
        body = self._read_json()
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            self._asked_model = body["model"][:200]  # for the status page, even if refused
        request = dialect.parse(body)
        self._note["model"] = request.model
        refusal = self.server.subscription.refusal()
        if refusal is not None:  # nothing runs: the subscription is kept as the user asked
            raise refusal
        launch = self.server.launch(request)
        answer = dialect.answer(request, self._request_id, request.stream)
        with self.server.serving():
            try:
                with ClaudeRun(self.server, launch, self.connection, self._note,
                               self._send_gathered if request.stream else None) as run, \
                        contextlib.closing(run.events()) as events:
                    if request.stream:
                        self._stream(answer, events, run)
                    else:
                        for event in events:
                            answer.feed(event)
                        self.server.warm.predict(run.launch, answer)
                        self._note_usage(answer.finish.usage)
                        self._send_json(200, answer.body())
            except APIError as error:
                self._send_error(error)  # within serving(): a shutdown waits for this answer

    def _stream(self, answer: Answer, events: Iterator[Event], run: ClaudeRun) -> None:
        """Relay events as SSE. Headers go out with the first model event, so a failure before
        it is a real HTTP error status; after it, an error is the dialect's final error event."""
        started = False
        try:
            for event in events:
                if not started:
                    started = True
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream; charset=utf-8")
                    self.send_header("Cache-Control", "no-cache")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.send_header("X-Request-Id", self._request_id)
                    self.send_header("X-Accel-Buffering", "no")
                    self.end_headers()
                self._gathered += answer.feed(event)
                if isinstance(event, Finish):  # before the client has it all and asks again
                    self.server.warm.predict(run.launch, answer)
        except APIError as error:
            if not started:
                raise
            self._note["error"] = error.status
            self._error_code = error.code or error.type
            self._gathered += answer.stream_error(error)
        self._send_gathered()
        self._note_usage(answer.finish.usage)
        self._write_chunk(b"")

    def _send_gathered(self) -> None:
        """Send as one chunk the events gathered from the CLI's lines read so far: the CLI
        often prints dozens of deltas between two reads, and a write per event (33 us each)
        was most of the daemon's time in a long stream (measured)."""
        if self._gathered:  # an empty chunk would end the body
            self._write_chunk(bytes(self._gathered))
            del self._gathered[:]

    def _send_error(self, error: APIError) -> None:
        """In the shape of the dialect whose path was asked for (OpenAI's elsewhere)."""
        self._error_code = error.code or error.type
        if self._dialect is None:
            super()._send_error(error)
            return
        status, body = self._dialect.error(error)
        self._send_json(status, body, error.headers.items())

    def _note_usage(self, usage: Dict[str, Any]) -> None:
        if usage:
            counts = self._usage_counts = openai_usage(usage)
            self._note["tokens"] = "%d/%d" % (counts["prompt_tokens"], counts["completion_tokens"])


##############################################################################
# Command line
##############################################################################

def _env_number(name: str, default: float, kind: Any = float) -> Any:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return kind(value)
    except ValueError:
        raise SystemExit("claude-max-proxy: %s=%r is not a number" % (name, value)) from None


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a number" % value) from None
    if not number > 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return number


def _count(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a whole number" % value) from None
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def _count_or_none(value: str) -> int:
    return 0 if value.strip() == "0" else _count(value)


def _percent(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a whole number" % value) from None
    if not 0 <= number <= 99:
        raise argparse.ArgumentTypeError("must be from 0 to 99")
    return number


def _size(value: str) -> int:
    """A byte count: 1048576, 1024k, 32m or 1g (powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmg]?)i?b?\s*", value, re.IGNORECASE)
    if not match or int(match.group(1)) < 1:
        raise argparse.ArgumentTypeError("%r is not a size such as 33554432 or 32m" % value)
    return int(match.group(1)) * int(1024 ** " kmg".index(match.group(2).lower() or " "))


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> "NoReturn":
        """A bad flag is one line, not a usage dump."""
        self.exit(2, "%s: error: %s (see --help)\n" % (self.prog, message))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    env = os.environ.get
    parser = _ArgumentParser(
        prog="claude-max-api",
        description="OpenAI and Anthropic APIs on top of the Claude Code CLI and your Claude "
                    "subscription. Every flag can also be set by the environment variable named.",
        epilog="Where the subscription stands: claude-max-api status [--json] (with the same "
               "--host, --port and key as the daemon). To run it at login with these flags: "
               "claude-max-api service install [FLAGS] (also: service uninstall, service "
               "status, service install --print).")
    add = parser.add_argument

    def number(flag: str, variable: str, default: float, check: Callable[[str], Any],
               text: str) -> None:
        """A numeric flag whose default comes from `variable`, named in its help."""
        add(flag, type=check, default=_env_number(variable, default, type(default)),
            help="%s (%s; default %%(default)s)" % (text, variable))

    add("--host", default=env("CLAUDE_MAX_API_HOST", DEFAULT_HOST),
        help="address to listen on (CLAUDE_MAX_API_HOST; default %(default)s). Anything but a "
             "loopback address needs --api-key")
    number("--port", "CLAUDE_MAX_API_PORT", DEFAULT_PORT, int, "port to listen on")
    add("--api-key", default=env("CLAUDE_MAX_API_KEY", ""), metavar="KEY[,KEY...]",
        help="require one of these keys, as `Authorization: Bearer KEY` or `x-api-key: KEY`, on "
             "every endpoint but /health (CLAUDE_MAX_API_KEY; default: no key)")
    add("--api-key-file", default=env("CLAUDE_MAX_API_KEY_FILE") or None, metavar="FILE",
        help="read more keys from FILE, one per line or comma-separated, which keeps them out "
             "of the process list (CLAUDE_MAX_API_KEY_FILE)")
    add("--cors-origin", default=env("CLAUDE_MAX_API_CORS_ORIGINS", ""),
        metavar="ORIGIN[,ORIGIN...]",
        help="web page origins allowed to call the API from a browser, such as "
             "http://localhost:3000 (CLAUDE_MAX_API_CORS_ORIGINS; default: none)")
    add("--allowed-host", default=env("CLAUDE_MAX_API_ALLOWED_HOSTS", ""),
        metavar="NAME[,NAME...]",
        help="host names clients may use besides localhost and loopback addresses, checked "
             "against the Host header (CLAUDE_MAX_API_ALLOWED_HOSTS)")
    add("--claude-bin", default=env("CLAUDE_BIN") or None,
        help="the claude CLI to run (CLAUDE_BIN; default: found on PATH or in the usual install "
             "locations)")
    number("--max-concurrency", "CLAUDE_MAX_API_MAX_CONCURRENCY", DEFAULT_MAX_CONCURRENCY, _count,
           "CLI processes at once; more requests wait in line")
    number("--max-queue", "CLAUDE_MAX_API_MAX_QUEUE", DEFAULT_MAX_QUEUE, _count,
           "requests that may wait for a CLI; more get 429")
    number("--queue-timeout", "CLAUDE_MAX_API_QUEUE_TIMEOUT", DEFAULT_QUEUE_TIMEOUT, _positive,
           "seconds a request may wait for a CLI before its 429")
    number("--timeout", "CLAUDE_MAX_API_TIMEOUT", DEFAULT_TIMEOUT, _positive,
           "seconds a whole request may take")
    number("--idle-timeout", "CLAUDE_MAX_API_IDLE_TIMEOUT", DEFAULT_IDLE_TIMEOUT, _positive,
           "seconds the CLI may print nothing before it is ended")
    number("--client-timeout", "CLAUDE_MAX_API_CLIENT_TIMEOUT", DEFAULT_CLIENT_TIMEOUT, _positive,
           "seconds a client may stay silent while sending a request, or not read its answer")
    add("--max-body", type=_size, default=env("CLAUDE_MAX_API_MAX_BODY") or DEFAULT_MAX_BODY,
        help="largest request body in bytes, k, m or g (CLAUDE_MAX_API_MAX_BODY; default "
             "%(default)s)")
    number("--shutdown-grace", "CLAUDE_MAX_API_SHUTDOWN_GRACE", DEFAULT_SHUTDOWN_GRACE, _positive,
           "seconds requests in flight may finish after SIGTERM or Ctrl-C")
    number("--warm", "CLAUDE_MAX_API_WARM", DEFAULT_WARM, _count_or_none,
           "CLI processes kept started ahead of requests, one for each of the request shapes "
           "used last, and a spare for the one in steady use (0: none); they count against "
           "--max-concurrency and start only while no request is in flight")
    number("--warm-idle", "CLAUDE_MAX_API_WARM_IDLE", DEFAULT_WARM_IDLE, _positive,
           "seconds a warm CLI waits for a request before a fresh one replaces it")
    add("--reserve", type=_percent, default=_env_number(
            "CLAUDE_MAX_API_RESERVE", DEFAULT_RESERVE, int), metavar="PERCENT",
        help="keep this share of the subscription's 5-hour and weekly windows for your own use: "
             "while either is used beyond 100-PERCENT %%, requests get a 429 at once "
             "(CLAUDE_MAX_API_RESERVE; default %(default)s: off)")
    add("--allow-extra-usage", action="store_true",
        default=env("CLAUDE_MAX_API_ALLOW_EXTRA_USAGE", "").strip().lower() in ("1", "true",
                                                                                  "yes"),
        help="go on once the plan's limit is used up and requests are billed as extra usage; "
             "by default they are refused until the limit resets "
             "(CLAUDE_MAX_API_ALLOW_EXTRA_USAGE=1)")
    add("--user-settings", action="store_true",
        default=env("CLAUDE_MAX_API_USER_SETTINGS", "").strip().lower() in ("1", "true", "yes"),
        help="let the CLI read your own ~/.claude settings: their env block and apiKeyHelper, "
             "but also your CLAUDE.md memory, hooks, output style, agents and skills, which "
             "every API caller then gets (CLAUDE_MAX_API_USER_SETTINGS=1; default: none of it)")
    add("--history", choices=["turns", "transcript"],
        default=env("CLAUDE_MAX_API_HISTORY", "turns").strip().lower() or "turns",
        help="how a conversation's earlier messages reach the model: as its real turns, so the "
             "prompt cache covers them, or as one transcript in the last message "
             "(CLAUDE_MAX_API_HISTORY; default %(default)s)")
    add("--log-level", type=str.upper, default=env("CLAUDE_MAX_API_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log verbosity (CLAUDE_MAX_API_LOG_LEVEL; default %(default)s)")
    add("--version", action="version", version="%(prog)s " + __version__)
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    for name in ("max_concurrency", "max_queue"):  # from the environment, unchecked by _count
        if getattr(args, name) < 1:
            parser.error("--%s must be at least 1" % name.replace("_", "-"))
    if args.warm < 0 or not args.warm_idle > 0:
        parser.error("--warm must be 0 or more and --warm-idle more than 0")
    if not 0 <= args.reserve <= 99:  # from the environment, unchecked by _percent
        parser.error("--reserve must be from 0 to 99")
    args.api_keys = split_list(args.api_key)
    if args.api_key_file:
        try:
            with open(os.path.expanduser(args.api_key_file), encoding="utf-8") as f:
                args.api_keys += split_list(",".join(f.read().split()))
        except (OSError, UnicodeDecodeError) as e:
            parser.error("cannot read --api-key-file: %s" % e)
        if not args.api_keys:
            parser.error("--api-key-file %s holds no key" % args.api_key_file)
    if args.history not in ("turns", "transcript"):  # from the environment, unchecked
        parser.error("CLAUDE_MAX_API_HISTORY must be turns or transcript")
    args.cors_origins = split_list(args.cors_origin)
    args.allowed_hosts = split_list(args.allowed_host)
    return args


def status_main(argv: List[str]) -> int:
    """`status [--json] [daemon flags]`: ask the running daemon (the host, port and key of its
    flags and environment variables) and print one screen, or with --json its /v1/usage. What
    goes wrong is one line on stderr and exit 1, never a traceback."""
    as_json = "--json" in argv
    settings = parse_args([a for a in argv if a != "--json"])
    host = settings.host if listens_on_loopback_only(settings.host) else "127.0.0.1"
    where = host_port(host, settings.port)
    try:
        usage = ask_daemon(host, settings.port, "/v1/usage", settings.api_keys)
        health = {} if as_json else ask_daemon(host, settings.port, "/health",
                                               settings.api_keys)
    except ConnectionRefusedError:
        print("claude-max-proxy: nothing listens on %s; start it with `python3 "
              "claude_max_proxy.py` (or `claude-max-api service install` to run it at login)."
              % where, file=sys.stderr)
        return 1
    except PermissionError as e:
        print("claude-max-proxy on %s refused the key (%s): set CLAUDE_MAX_API_KEY, or pass "
              "--api-key, to one of its keys." % (where, e), file=sys.stderr)
        return 1
    except (OSError, ValueError, http.client.HTTPException) as e:
        print("claude-max-proxy on %s: %s" % (where, " ".join(str(e).split()) or
                                               type(e).__name__), file=sys.stderr)
        return 1
    try:
        if as_json:
            print(json.dumps(usage, indent=2))
        else:
            color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
            sys.stdout.write(status_text(usage, health, where, time.time(), color))
        sys.stdout.flush()
    except BrokenPipeError:  # `status | head`: the reader left
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def ask_daemon(host: str, port: int, path: str, keys: List[str]) -> Dict[str, Any]:
    """GET `path` of the daemon as JSON. Raises ConnectionRefusedError when nothing listens,
    PermissionError when it refuses the key, OSError with its message for other errors."""
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", path, headers={"Authorization": "Bearer %s" % keys[0]} if keys
                     else {})
        response = conn.getresponse()
        body = json.loads(response.read())
    finally:
        conn.close()
    if not isinstance(body, dict):
        raise ValueError("%s answered %s, not an object" % (path, type(body).__name__))
    if response.status == 401:
        raise PermissionError((body.get("error") or {}).get("message") or "401")
    if response.status != 200 and path != "/health":
        error = body.get("error")
        raise OSError("%s answered %d: %s" % (path, response.status, error.get("message")
                                              if isinstance(error, dict) else body))
    return body


def listens_on_loopback_only(host: str) -> bool:
    """Whether every address `host` stands for is a loopback one ("" and 0.0.0.0 are not)."""
    if not host:
        return False
    try:
        addresses = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return is_loopback(host)
    return all(is_loopback(str(address[4][0])) for address in addresses)


##############################################################################
# Running at login: `service install`, `uninstall`, `status` (launchd or systemd --user)
##############################################################################

SERVICE_LABEL = "com.claude-max-api"  # launchd's label; systemd's unit is claude-max-api.service
SERVICE_UNIT = "claude-max-api.service"
# launchd's own PATH (/usr/bin:/bin:/usr/sbin:/sbin) misses the CLI: these follow its own dir.
SERVICE_PATH = ("~/.local/bin", "~/.claude/local", "/opt/homebrew/bin", "/usr/local/bin",
                "/usr/bin", "/bin", "/usr/sbin", "/sbin")
SERVICE_KEY_FILE = "~/.config/claude-max-api/keys"  # where `install --api-key` puts keys
HEALTH_WAIT = 20.0  # seconds `install` waits for the new daemon's /health
MARK = "written by claude-max-proxy service install"  # and the sha256 of what follows it


def marked(head: str, body: str, comment: str) -> str:
    """`head`, then a comment line that names its writer and the digest of `body`, then `body`:
    a later install can tell a file it wrote from one changed by hand."""
    digest = hashlib.sha256(body.encode("utf-8")).hexdigest()
    return head + comment % ("%s, sha256 %s" % (MARK, digest)) + "\n" + body


def changed_by_hand(path: str) -> bool:
    """Whether the file at `path` exists and is not as `install` wrote it."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return False
    except (OSError, UnicodeDecodeError):
        return True
    found = re.search(re.escape(MARK) + r", sha256 ([0-9a-f]{64})[^\n]*\n", text)
    return not found or found.group(1) != hashlib.sha256(
        text[found.end():].encode("utf-8")).hexdigest()


def service_flags(flags: List[str]) -> Tuple[List[str], Optional[str], argparse.Namespace]:
    """The daemon's flags as a service gets them: an --api-key moves to a key file (returned,
    to be written) and the service gets --api-key-file instead, never the key in clear."""
    # Parsed as the service will see them: a bad flag fails here, not at every login, and the
    # installer's own CLAUDE_MAX_API_* and CLAUDE_BIN (which the service does not get) count not.
    ours = [name for name in os.environ if name.startswith("CLAUDE_MAX_API_") or
            name == "CLAUDE_BIN"]
    kept = {name: os.environ.pop(name) for name in ours}
    try:
        settings = parse_args(flags)
    finally:
        os.environ.update(kept)
    out, keys, i = [], None, 0
    while i < len(flags):
        flag = flags[i]
        name, eq, value = flag.partition("=")
        if name == "--api-key":
            if not eq:
                i += 1
                value = flags[i]
            keys = value
        else:
            out.append(flag)
        i += 1
    if keys:
        out += ["--api-key-file", os.path.expanduser(SERVICE_KEY_FILE)]
    return out, keys, settings


class Service:
    """One way of running the daemon at login; each subclass has these members in this order."""
    kind = ""

    def __init__(self, flags: List[str]):
        self.flags, self.keys, self.settings = service_flags(flags)
        self.claude = find_claude(self.settings.claude_bin)
        first = [os.path.dirname(self.claude)] if self.claude else []
        seen: List[str] = []
        for entry in first + [os.path.expanduser(p) for p in SERVICE_PATH]:
            if entry not in seen:
                seen.append(entry)
        self.path_variable = ":".join(seen)
        self.program = [sys.executable, os.path.abspath(__file__)] + self.flags

    def file(self) -> str:
        raise NotImplementedError

    def text(self) -> str:
        raise NotImplementedError

    def log(self) -> str:
        raise NotImplementedError

    def load_commands(self) -> List[List[str]]:
        raise NotImplementedError

    def unload_commands(self) -> List[List[str]]:
        raise NotImplementedError

    def loaded(self) -> bool:
        raise NotImplementedError

    def note(self) -> str:
        return ""


class LaunchdService(Service):
    kind = "launchd"

    def file(self) -> str:
        return os.path.expanduser("~/Library/LaunchAgents/%s.plist" % SERVICE_LABEL)

    def log(self) -> str:
        return os.path.expanduser("~/Library/Logs/claude-max-api.log")

    def text(self) -> str:
        plist = {
            "Label": SERVICE_LABEL, "ProgramArguments": self.program,
            "EnvironmentVariables": {"PATH": self.path_variable},
            "RunAtLoad": True, "KeepAlive": True,  # and again whenever it stops
            "ThrottleInterval": 10,  # a failing start does not spin
            "ExitTimeOut": 20,  # SIGTERM: --shutdown-grace (10 s), then the CLIs are ended
            # Not Background (nor unset, nor Standard): those throttle the CPU and I/O of the
            # daemon and of every CLI it starts, and someone waits on every answer.
            "ProcessType": "Interactive",
            "StandardOutPath": self.log(), "StandardErrorPath": self.log(),
        }
        head, _, body = plistlib.dumps(plist).decode("utf-8").partition("<plist")
        return marked(head, "<plist" + body, "<!-- %s -->")

    def target(self) -> str:
        return "gui/%d" % os.getuid()

    def load_commands(self) -> List[List[str]]:
        commands = [["launchctl", "bootout", "%s/%s" % (self.target(), SERVICE_LABEL)]] \
            if self.loaded() else []
        return commands + [["launchctl", "bootstrap", self.target(), self.file()]]

    def unload_commands(self) -> List[List[str]]:
        return [["launchctl", "bootout", "%s/%s" % (self.target(), SERVICE_LABEL)]]

    def loaded(self) -> bool:
        return run_quietly(["launchctl", "print", "%s/%s" % (self.target(), SERVICE_LABEL)])


class SystemdService(Service):
    kind = "systemd --user"

    def file(self) -> str:
        config = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
        return os.path.join(config, "systemd", "user", SERVICE_UNIT)

    def log(self) -> str:
        return "journalctl --user -u %s" % SERVICE_UNIT

    def text(self) -> str:
        def quoted(arg: str) -> str:  # systemd's quoting; % starts a specifier, $ a variable
            return '"%s"' % arg.replace("\\", "\\\\").replace('"', '\\"').replace(
                "%", "%%").replace("$", "$$")
        return marked("", "\n".join([
            "[Unit]",
            "Description=claude-max-proxy: OpenAI and Anthropic APIs on the Claude Code CLI",
            "After=network.target",
            "",
            "[Service]",
            "ExecStart=" + " ".join(quoted(a) for a in self.program),
            "Environment=" + quoted("PATH=" + self.path_variable),
            "Restart=always",
            "RestartSec=5",
            "KillMode=mixed",  # SIGTERM to the daemon, which ends its CLIs; then the rest
            "TimeoutStopSec=20",
            "",
            "[Install]",
            "WantedBy=default.target",
            ""]), "# %s")

    def load_commands(self) -> List[List[str]]:
        commands = [["systemctl", "--user", "daemon-reload"],
                    ["systemctl", "--user", "enable", "--now", SERVICE_UNIT]]
        if self.loaded():  # running with the old unit: take the new one
            commands.append(["systemctl", "--user", "restart", SERVICE_UNIT])
        return commands

    def unload_commands(self) -> List[List[str]]:
        return [["systemctl", "--user", "disable", "--now", SERVICE_UNIT]]

    def loaded(self) -> bool:
        return run_quietly(["systemctl", "--user", "is-active", "--quiet", SERVICE_UNIT])

    def note(self) -> str:
        return (" It runs while you are logged in; `loginctl enable-linger %s` keeps it "
                "running after you log out." % (os.environ.get("USER") or "$USER"))


def run_quietly(command: List[str]) -> bool:
    """Whether `command` ran and succeeded (its output is not wanted)."""
    try:
        return subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def health(settings: argparse.Namespace, timeout: float) -> Optional[Dict[str, Any]]:
    """The daemon's /health as it answers on its port, or None when nothing answers."""
    host = settings.host if listens_on_loopback_only(settings.host) else "127.0.0.1"
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = http.client.HTTPConnection(host, settings.port, timeout=5)
            conn.request("GET", "/health", headers={"Authorization": "Bearer %s" % (
                (settings.api_keys or [""])[0])})
            body = json.loads(conn.getresponse().read())
            conn.close()
            return body if isinstance(body, dict) else None
        except (OSError, ValueError):
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.2)


def service_main(argv: List[str]) -> int:
    """`service install [--print] [--force] [daemon flags]`, `service uninstall`, `service
    status`."""
    parser = _ArgumentParser(prog="claude-max-api service", description=(
        "Run the daemon at login (launchd on macOS, systemd --user on Linux)."))
    parser.add_argument("action", choices=("install", "uninstall", "status"))
    parser.add_argument("--print", action="store_true", dest="dry_run",
                        help="show what install would write and run, and change nothing")
    parser.add_argument("--force", action="store_true",
                        help="overwrite a service file that was changed by hand")
    args, flags = parser.parse_known_args(argv)
    if sys.platform == "darwin":
        service: Service = LaunchdService(flags)
    elif sys.platform.startswith("linux"):
        service = SystemdService(flags)
    else:
        raise SystemExit("claude-max-api service: only macOS (launchd) and Linux (systemd) are "
                         "supported; run the daemon as you run other services there.")
    if args.action == "install":
        return service_install(service, args.dry_run, args.force)
    if args.action == "uninstall":
        return service_uninstall(service)
    return service_status(service)


def service_install(service: Service, dry_run: bool, force: bool) -> int:
    path, text = service.file(), service.text()
    if dry_run:
        print("the claude CLI found now: %s" % (service.claude or "none (PATH, then %s)"
                                                 % ", ".join(CLAUDE_SEARCH_PATHS)))
        print("would write %s (%s):\n\n%s" % (path, service.kind, text))
        if service.keys:
            print("would write the API key(s) to %s (mode 0600)" % SERVICE_KEY_FILE)
        for command in service.load_commands():
            print("would run: " + " ".join(shlex.quote(a) for a in command))
        return 0
    if changed_by_hand(path) and not force:
        raise SystemExit("claude-max-api service: %s was changed by hand; not overwriting it. "
                         "Run `service install --force` to replace it." % path)
    if service.keys:
        write_private(os.path.expanduser(SERVICE_KEY_FILE), service.keys + "\n")
    write_private(path, text, mode=0o644)
    if service.kind == "launchd":
        os.makedirs(os.path.dirname(service.log()), exist_ok=True)
    for command in service.load_commands():
        try:
            done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SystemExit("claude-max-api service: %s failed: %s" % (command[0], e)) from None
        if done.returncode != 0 and command[1] != "bootout":
            raise SystemExit("claude-max-api service: `%s` failed (%d): %s" % (
                " ".join(command), done.returncode,
                (done.stderr or done.stdout).decode("utf-8", "replace").strip()[-500:]))
    answer = health(service.settings, HEALTH_WAIT)
    url = "http://%s:%d/v1" % (service.settings.host, service.settings.port)
    if answer is None:
        raise SystemExit("claude-max-api service: installed %s, but nothing answers on %s after "
                         "%g s; see the log (%s)." % (path, url, HEALTH_WAIT, service.log()))
    claude = answer.get("claude") or {}
    if answer.get("status") != "ok":
        raise SystemExit("claude-max-api service: installed and running on %s, but %s. Log: %s"
                         % (url, str(answer.get("reason") or "it is not healthy").rstrip("."),
                            service.log()))
    print("claude-max-api runs at login (%s): serving %s with Claude Code %s (%s); log: %s.%s"
          % (service.kind, url, claude.get("version"), claude.get("path") or service.claude,
             service.log(), service.note()))
    return 0


def service_uninstall(service: Service) -> int:
    path = service.file()
    if not os.path.exists(path):
        print("claude-max-api service: not installed (%s does not exist)." % path)
        return 0
    for command in service.unload_commands():
        run_quietly(command)
    os.unlink(path)
    if service.kind != "launchd":
        run_quietly(["systemctl", "--user", "daemon-reload"])
    keys = os.path.expanduser(SERVICE_KEY_FILE)
    print("claude-max-api service: stopped and removed %s.%s" % (
        path, " The key file %s is kept." % keys if os.path.exists(keys) else ""))
    return 0


def service_status(service: Service) -> int:
    path = service.file()
    installed, loaded = os.path.exists(path), service.loaded()
    answer = health(service.settings, 0) if installed or loaded else None
    print("installed: %s\nloaded: %s (%s)\nanswering: %s\nlog: %s" % (
        "yes, " + path if installed else "no", "yes" if loaded else "no", service.kind,
        "yes, %s with Claude Code %s" % (answer.get("status"), (answer.get("claude") or {}).get(
            "version")) if answer else "no", service.log()))
    return 0 if installed and loaded and answer else 3  # 3: "not running", as LSB says


##############################################################################
# Running it: main()
##############################################################################

def give_back_memory() -> None:
    """Once started: hand back to the system what starting freed (the syntax tree compiling
    this file made, see run_as_script), which glibc keeps unless asked: 34.3 MB -> 25.5 MB
    (measured). Elsewhere, or without ctypes, nothing happens."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (ImportError, OSError, AttributeError):
        pass


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["service"]:
        return service_main(argv[1:])
    if argv[:1] == ["status"]:
        return status_main(argv[1:])
    if argv[:1] == ["mcp-bridge"]:  # the MCP server of a request with tools (BRIDGE_START)
        return bridge_main(argv[1:] + [__version__] if len(argv) == 2 else argv[1:])
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    if not args.api_keys and not listens_on_loopback_only(args.host):
        raise SystemExit("claude-max-proxy: refusing to listen on %s without an API key: anyone "
                         "who can reach it could use your subscription. Set --api-key (or "
                         "CLAUDE_MAX_API_KEY), or listen on 127.0.0.1." % (args.host or "*"))
    try:
        server = ProxyServer((args.host, args.port), args)
    except OSError as e:
        raise SystemExit("claude-max-proxy: cannot listen on %s:%d: %s"
                         % (args.host, args.port, e.strerror or e)) from None

    def stop(signum: int, frame: Any) -> None:
        if server.stopping.is_set():  # a second Ctrl-C: no more grace
            log.info("%s: ending the requests in flight now", signal.Signals(signum).name)
            threading.Thread(target=server.hurry_up, daemon=True).start()
            return
        log.info("%s: shutting down", signal.Signals(signum).name)
        server.stopping.set()
        threading.Thread(target=server.stop_accepting, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    url = "http://%s/v1" % host_port(str(server.server_address[0]), server.server_address[1])
    access = "%s, browser origins: %s, up to %d CLI processes at once, %d of them warm" % (
        "%d API key(s) required" % len(args.api_keys) if args.api_keys else "no API key",
        ", ".join(args.cors_origins) or "none", args.max_concurrency, server.warm.size)
    path, version, problem = server.claude.status()
    if path:
        log.info("claude-max-proxy %s serving %s with %s (%s); %s", __version__, url, path,
                 version, access)
    else:
        log.warning("claude-max-proxy %s serving %s, but %s; %s", __version__, url, problem,
                    access)
    login = server.login.check() if path else None
    if login and not login["logged_in"]:
        log.warning("Claude Code is not logged in: requests will fail until you run `claude auth "
                    "login` as this user")
    elif (login["method"] == "api_key") if login else bool(os.environ.get("ANTHROPIC_API_KEY")):
        log.warning("Claude Code uses an API key (ANTHROPIC_API_KEY or an apiKeyHelper): "
                    "requests are billed per token to that API account, not to your "
                    "subscription")
    if args.reserve or args.allow_extra_usage:
        log.info("subscription: %s; %s", "%d%% of each window kept for you (--reserve)"
                 % args.reserve if args.reserve else "no share kept (--reserve 0)",
                 "extra usage allowed (--allow-extra-usage)" if args.allow_extra_usage else
                 "no extra usage")
    if args.user_settings:
        log.warning("--user-settings: every API caller gets your ~/.claude setup (CLAUDE.md, "
                    "output style, agents, skills) and your hooks run for every request")
    give_back_memory()
    try:
        server.serve_forever()
    finally:
        server.server_close()  # no new connections from here on
        server.finish_requests(args.shutdown_grace)
    log.info("stopped")
    return 0


# How run_as_script() runs this file again: by runpy, told so by RUN_BY_RUNPY in its globals.
RUNPY_START = ("import runpy, sys; sys.argv = sys.argv[1:]; "
               "runpy.run_path(sys.argv[0], {'RUN_BY_RUNPY': True}, '__main__')")


def run_as_script() -> None:
    """`python3 claude_max_proxy.py`: Python keeps the syntax tree of a file it runs as a
    script until the script ends, for a daemon never: some 12 MB for this one (a daemon held
    37.6 MB, against 25.5 MB run by runpy, measured). runpy frees it once the file is compiled
    (give_back_memory returns it to the system). So the script has the same interpreter, with
    the same flags and arguments, run it by runpy instead, in this same process (exec: the
    pid, which launchd and systemd watch, stays). Returns only if that cannot be done; the
    daemon then runs as it is."""
    if globals().get("RUN_BY_RUNPY") or not sys.executable or not hasattr(os, "execv"):
        return
    # The interpreter's own flags (-I, -E, -S, -X ...), as multiprocessing passes them on.
    flags: List[str] = getattr(subprocess, "_args_from_interpreter_flags", lambda: [])()
    try:
        os.execv(sys.executable, [sys.executable] + flags + [
            "-c", RUNPY_START, os.path.abspath(__file__)] + sys.argv[1:])
    except OSError:
        return


if __name__ == "__main__":
    run_as_script()
    sys.exit(main())
