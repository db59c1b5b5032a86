"""Tests for claude_max_proxy: the specification of what the proxy does.

    python3 -m unittest -v test_proxy

Four layers, all talking only to 127.0.0.1:

* the pure translation functions, called directly;
* a real server on port 0 running a fake `claude` (FAKE_CLAUDE below, written to a temp dir and
  put on PATH) that speaks exactly the stream-json the real CLI 2.1.331 speaks, as recorded in
  shared/claude-cli/ (the tests do not need that folder at run time);
* EndToEndTest: the real CLI (npm @anthropic-ai/claude-code@2.1.331) against a fake Anthropic
  Messages API served by the test; skipped when the CLI is not installed;
* OpenAISDKTest and AnthropicSDKTest: the official `openai` and `anthropic` packages as the
  clients; skipped when they are not installed.

The three API dialects pass DialectContract, written once and run for each.

PROXY_REQUIRE_ALL=1 turns those two skips into failures (CI sets it). PROXY_BENCH=1 runs the
benchmark, which prints figures and asserts nothing about speed.
"""

import argparse
import base64
import collections
import contextlib
import email.message
import hashlib
import http.client
import io
import json
import os
import plistlib
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
import unittest
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from unittest import mock

import claude_max_proxy as proxy

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIRE_ALL = os.environ.get("PROXY_REQUIRE_ALL") == "1"
PNG_1PX = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC")

##############################################################################
# The fake `claude`
##############################################################################

# Speaks claude 2.1.331's print mode: the flags it checks, the stream-json lines with the keys the
# real CLI writes (see shared/claude-cli/c-streamjson-partial, e1-*, e2-*, e5-*, j1-*,
# nocred-*), exit code 1 with nothing on stderr for API errors, plain-text usage errors.
# What it does is chosen by directives in the prompt: [[fake:NAME]] or [[fake:NAME:ARG]].
# Each run writes a record (argv, cwd, environment, stdin, system prompt file) to
# $FAKE_CLAUDE_LOG/<pid>.json before answering, so tests can check what the proxy sent.
FAKE_CLAUDE = r'''
import json, os, random, re, signal, subprocess, sys, time, uuid

VERSION = "2.1.331 (Claude Code)"
VALUE_FLAGS = {"--input-format", "--output-format", "--model", "--tools", "--permission-mode",
               "--append-system-prompt", "--append-system-prompt-file", "--system-prompt",
               "--system-prompt-file", "--mcp-config", "--setting-sources", "--settings",
               "--max-turns", "--fallback-model", "--session-id", "--resume", "--allowedTools",
               "--disallowedTools", "--effort", "--json-schema", "--max-budget-usd", "--add-dir"}
BOOL_FLAGS = {"-p", "--print", "--verbose", "--include-partial-messages", "--strict-mcp-config",
              "--no-session-persistence", "--disable-slash-commands", "--replay-user-messages",
              "--dangerously-skip-permissions", "--bare", "--safe-mode"}
DEFAULT_TOOLS = ["Task", "Bash", "Edit", "Read", "WebFetch", "WebSearch", "Write"]
SESSION = str(uuid.uuid4())
REPLY = ["Hello", " from", " the", " fake", " API."]
MCP_TOOLS: list = []  # the tools the --mcp-config servers listed: the model sees mcp__<server>__<name>
DENIED = ("Permission to use %s has been denied because Claude Code is running in don't ask "
          "mode. IMPORTANT: You *may* attempt to accomplish this action using other tools that "
          "might naturally be used to accomplish this goal, e.g. using head instead of cat.")


def fail(message):
    sys.stderr.write(message + "\n")
    sys.exit(1)


def parse(argv):
    opts, prompt = {}, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if arg in BOOL_FLAGS:
            opts[arg] = True
        elif name in VALUE_FLAGS:
            if not eq:
                i += 1
                if i >= len(argv):
                    fail("error: option '%s <value>' argument missing" % name)
                value = argv[i]
            opts[name] = value
        elif arg.startswith("-"):
            fail("error: unknown option '%s'" % arg)
        else:
            prompt.append(arg)
        i += 1
    return opts, prompt


def resolve(model):
    if model in (None, "default", "best", "opus", "opus[1m]", "opusplan"):
        return "claude-opus-5-5"
    if model in ("sonnet", "sonnet[1m]"):
        return "claude-sonnet-5-5"
    if model == "haiku":
        return "claude-haiku-5-5"
    return model


def out(obj):
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def init(opts, model):
    tools = [] if opts.get("--tools") == "" else DEFAULT_TOOLS
    tools = (["StructuredOutput"] if opts.get("--json-schema") else []) + sorted(
        tools + [t["name"] for t in MCP_TOOLS])
    servers = sorted({t["server"] for t in MCP_TOOLS})
    return {"type": "system", "subtype": "init", "cwd": os.getcwd(), "session_id": SESSION,
            "tools": tools, "mcp_servers": [{"name": name, "status": "connected",
                                             "source": "dynamic"} for name in servers],
            "model": model,
            "permissionMode": opts.get("--permission-mode", "default"),
            "slash_commands": [] if opts.get("--disable-slash-commands") else ["compact", "context"],
            "terminal_slash_commands": [], "apiKeySource": "none",
            "claude_code_version": VERSION.split()[0], "output_style": "default",
            "agents": ["general-purpose"], "skills": [], "plugins": [], "capabilities": [],
            "analytics_disabled": True, "product_feedback_disabled": True,
            "served_by_anthropic": True, "uuid": str(uuid.uuid4()), "sandbox_enabled": False,
            "memory_paths": {}, "original_cwd": os.getcwd(), "additional_directories": [],
            "messaging_socket_path": "/tmp/x/%d.sock" % os.getpid(), "fast_mode_state": "off",
            "fast_mode_disabled_reason": "sdk_opt_in_required", "per_turn_effort_active": True,
            "ultrathink_available": False, "ultrathink_typed_raises": False,
            "view_mode": "default"}


def init_line(opts, model):
    line = init(opts, model)
    if opts.get("--disable-slash-commands"):
        del line["terminal_slash_commands"]  # as 2.1.331 does (seen in the end-to-end test)
    if opts.get("--safe-mode") or os.environ.get("CLAUDE_CODE_DISABLE_AUTO_MEMORY") == "1":
        del line["memory_paths"]  # no auto-memory, no key (seen in the end-to-end test)
    return line


def ui_invalidate():
    """The first line of 2.1.331 with --safe-mode (shared/claude-cli/p-*)."""
    return {"type": "system", "subtype": "ui_invalidate", "event": "ui.render",
            "uuid": str(uuid.uuid4()), "session_id": SESSION}


def status():
    return {"type": "system", "subtype": "status", "status": "requesting",
            "session_id": SESSION, "uuid": str(uuid.uuid4())}


def stream(event, message_id, **extra):
    line = {"type": "stream_event", "event": event, "session_id": SESSION,
            "parent_tool_use_id": None, "uuid": str(uuid.uuid4())}
    line.update(extra)
    line["api_message_id"] = message_id
    return line


def usage(input_tokens, output_tokens, cache_creation=0, cache_read=0):
    return {"input_tokens": input_tokens, "cache_creation_input_tokens": cache_creation,
            "cache_read_input_tokens": cache_read, "output_tokens": output_tokens,
            "service_tier": "standard"}


def assistant(message_id, model, block, usage_):
    return {"type": "assistant", "message": {
        "id": message_id, "type": "message", "role": "assistant", "model": model,
        "content": [block], "stop_reason": None, "stop_sequence": None, "usage": usage_,
        "context_management": None}, "parent_tool_use_id": None, "session_id": SESSION,
        "uuid": str(uuid.uuid4()), "timestamp": "2026-11-24T11:37:17.022Z",
        "request_id": "req_fake_" + uuid.uuid4().hex[:16]}


def full_usage(u):
    u = dict(u)
    u.update({"output_tokens_details": {"thinking_tokens": 0},
              "server_tool_use": {"web_search_requests": 0, "web_fetch_requests": 0},
              "cache_creation": {"ephemeral_1h_input_tokens": 0, "ephemeral_5m_input_tokens": 0},
              "inference_geo": "", "iterations": [], "speed": "standard",
              "fallback_credit": None})
    return u


SUBAGENT_STATS = {"spawned": 0, "requested": {"background": 0, "foreground": 0, "unset": 0},
                  "started_in_background": 0, "max_depth": 0, "spawned_by_subagents": 0,
                  "completed": 0, "failed": 0, "killed": {"parent": 0, "user": 0, "system": 0},
                  "refused": {"depth_limit": 0, "concurrency_limit": 0, "budget": 0},
                  "by_type": {}}


def model_usage(model, u):
    return {model: {
        "inputTokens": u["input_tokens"], "outputTokens": u["output_tokens"],
        "cacheReadInputTokens": u["cache_read_input_tokens"],
        "cacheCreationInputTokens": u["cache_creation_input_tokens"], "webSearchRequests": 0,
        "costUSD": 0.000228, "contextWindow": 1000000, "maxOutputTokens": 128000,
        "thinkingTokens": 0, "cacheCreationEphemeral5mInputTokens": 0,
        "cacheCreationEphemeral1hInputTokens": 0, "canonicalModel": model,
        "provider": "firstParty", "costBasis": "list"}}


def result(model, text, u, stop_reason="end_turn", is_error=False, subtype="success",
           api_status=None, terminal="completed", errors=None, api_error_type=None):
    """A result line with the keys, and in the order, that 2.1.331 writes: not "type" first.
    Successful answers carry timing keys; API errors carry api_error_type; error subtypes
    carry `errors` instead of `result`."""
    usage_ = {} if is_error and subtype == "success" else model_usage(model, u)
    r = {"duration_api_ms": 0 if is_error else 113, "stop_reason": stop_reason,
         "session_id": SESSION, "total_cost_usd": 0 if usage_ == {} else 0.000228,
         "usage": full_usage(u), "modelUsage": usage_, "permission_denials": [],
         "terminal_reason": terminal, "fast_mode_state": "off",
         "fast_mode_disabled_reason": "sdk_opt_in_required", "subagent_stats": SUBAGENT_STATS,
         "safety_stops": 0, "is_error": is_error, "num_turns": 1, "subtype": subtype}
    if subtype != "success":
        r["errors"] = errors or []
    else:
        r["api_error_status"] = api_status
        if api_error_type:
            r["api_error_type"] = api_error_type
        r["result"] = text
        if not is_error:
            r["ttft_ms"] = 155
    r.update({"type": "result", "duration_ms": 163, "uuid": str(uuid.uuid4())})
    if subtype == "success" and not is_error:
        r.update({"begun_message_ids": ["msg_fake_" + uuid.uuid4().hex[:20]],
                  "ttft_stream_ms": 54, "time_to_request_ms": 49, "first_content_frame_ms": 55})
    r.update({"queued_turn_count": 0, "result_index": 0,
              "model_usage_since_last_result": usage_})
    return r


def api_error(text, api_status, error, error_type=None, terminal="api_error", extra=None):
    """The synthetic assistant message and the is_error result of e1/e2/e5/nocred."""
    zero = usage(0, 0)
    line = {"type": "assistant", "message": {
        "diagnostics": None, "id": str(uuid.uuid4()), "container": None, "model": "<synthetic>",
        "role": "assistant", "stop_details": None, "stop_reason": "stop_sequence",
        "stop_sequence": "", "type": "message", "usage": zero,
        "content": [{"type": "text", "text": text}], "context_management": None},
        "parent_tool_use_id": None, "session_id": SESSION, "uuid": str(uuid.uuid4()),
        "timestamp": "2026-11-24T11:37:29.276Z", "error": error, "is_api_error_message": True}
    if api_status is not None:
        line.update({"request_id": "req_fake_" + uuid.uuid4().hex[:16],
                     "is_api_error_message": True, "api_error_status": api_status,
                     "api_error_type": error_type})
    r = result("<synthetic>", text, zero, stop_reason="stop_sequence", is_error=True,
               api_status=api_status, terminal=terminal, api_error_type=error_type
               if api_status is not None else None)
    # With the prompt on stdin (the proxy's way) the CLI adds this; with it on argv it does not.
    r = dict(list(r.items())[:-3] + [("begun_message_ids", [])] + list(r.items())[-3:])
    line.update(extra or {})
    r.update(extra or {})
    return [line, r]


def message_events(model, blocks, stop_reason="end_turn", u=None, pause=0.0, forever=False):
    """One API message as the CLI streams it: message_start, per block start/deltas/assistant/
    stop, message_delta, message_stop. blocks: [("text"|"thinking", [pieces])]."""
    message_id = "msg_fake_" + uuid.uuid4().hex[:20]
    later = []
    u = u or usage(12, 1)
    start = dict(u)
    start["output_tokens"] = 1
    yield stream({"type": "message_start", "message": {
        "id": message_id, "type": "message", "role": "assistant", "model": model,
        "content": [], "stop_reason": None, "stop_sequence": None, "usage": start}},
        message_id, ttft_ms=6, thinking_display="updates")
    for index, (kind, pieces) in enumerate(blocks):
        if kind == "tool_use":  # pieces: {"id", "name", "input", "pieces"} (r-mcp-tool-bridge)
            yield stream({"type": "content_block_start", "index": index, "content_block": {
                "type": "tool_use", "id": pieces["id"], "name": pieces["name"], "input": {}}},
                message_id)
            for piece in pieces["pieces"]:
                yield stream({"type": "content_block_delta", "index": index, "delta": {
                    "type": "input_json_delta", "partial_json": piece}}, message_id)
            line = assistant(message_id, model, {"type": "tool_use", "id": pieces["id"],
                                                 "name": pieces["name"],
                                                 "input": pieces["input"]}, start)
            if pieces["name"].startswith("mcp__"):
                server, _, tool = pieces["name"][5:].partition("__")
                line["tool_use_meta"] = [{"id": pieces["id"], "display_name": tool.replace(
                    "_", " ").title(), "server_display_name": server, "tool_name": tool}]
            yield line
            yield stream({"type": "content_block_stop", "index": index}, message_id)
            for line in pieces.get("after", []):  # the CLI's verdict comes as the block ends
                yield line
            later += pieces.get("later", [])
            continue
        empty = {"type": "text", "text": ""} if kind == "text" else {
            "type": "thinking", "thinking": "", "signature": ""}
        thinking = {"thinking_display": "updates"} if kind == "thinking" else {}
        yield stream({"type": "content_block_start", "index": index, "content_block": empty},
                     message_id, **thinking)
        n = estimated = 0
        while True:
            for piece in pieces:
                if pause:
                    time.sleep(pause)
                if kind == "thinking":  # before each thinking delta (shared/claude-cli/p-thinking)
                    step = max(1, (len(piece) + 3) // 4)
                    estimated += step
                    yield {"type": "system", "subtype": "thinking_tokens",
                           "estimated_tokens": estimated, "estimated_tokens_delta": step,
                           "session_id": SESSION, "uuid": str(uuid.uuid4())}
                delta = ({"type": "text_delta", "text": piece} if kind == "text"
                         else {"type": "thinking_delta", "thinking": piece})
                yield stream({"type": "content_block_delta", "index": index, "delta": delta},
                             message_id, **thinking)
                n += 1
            if not forever:
                break
        if kind == "thinking":
            yield stream({"type": "content_block_delta", "index": index,
                          "delta": {"type": "signature_delta", "signature": "fakesig=="}},
                         message_id)
            block = {"type": "thinking", "thinking": "".join(pieces), "signature": "fakesig=="}
        else:
            block = {"type": "text", "text": "".join(pieces)}
        line = assistant(message_id, model, block, start)
        if kind == "thinking":
            line.update({"thinking_duration_ms": 1, "thinking_display": "updates"})
        yield line
        yield stream({"type": "content_block_stop", "index": index}, message_id)
    yield stream({"type": "message_delta", "delta": {"stop_reason": stop_reason,
                                                     "stop_sequence": None},
                  "usage": {"output_tokens": u["output_tokens"]}}, message_id)
    for line in later:  # the tool results, as the calls were dealt with
        yield line
    yield stream({"type": "message_stop"}, message_id)


THIRD_PARTY = ("Third-party apps now draw from your extra usage, not your plan limits. Enable "
               "extra usage in your account settings to keep going.")
LONG_CONTEXT = "Extra usage is required for long context requests."


def subscription_info():
    """The rate_limit_info the CLI builds from the API's anthropic-ratelimit-unified-* headers
    (the test writes it to $FAKE_CLAUDE_LOG/unified.info), on a subscription login only."""
    path = os.path.join(os.environ.get("FAKE_CLAUDE_LOG", ""), "unified.info")
    if os.environ.get("ANTHROPIC_API_KEY") or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def auth_status():
    """`claude auth status --json`, as 2.1.331 answers it for each way of logging in."""
    home = os.path.expanduser("~/.claude")
    answer = {"loggedIn": True, "authMethod": "none", "apiProvider": "firstParty",
              "analyticsDisabled": True, "projectsDirectory": os.path.join(home, "projects"),
              "configDirectory": home, "loginExpiresAt": None,
              "consoleProfileSignInOffered": True}
    if os.environ.get("ANTHROPIC_API_KEY"):
        answer.update(authMethod="api_key", apiKeySource="ANTHROPIC_API_KEY")
    elif os.environ.get("CLAUDE_CODE_OAUTH_TOKEN") or os.environ.get("ANTHROPIC_AUTH_TOKEN"):
        answer["authMethod"] = "oauth_token"
    elif os.path.exists(os.path.join(home, ".credentials.json")):
        answer.update(authMethod="claude.ai", email=None, orgId=None, orgName=None,
                      subscriptionType="max", storedClaudeAiLogin=True, planTier="max_other")
    else:
        answer["loggedIn"] = False
    time.sleep(float(os.environ.get("FAKE_CLAUDE_AUTH_DELAY") or 0))
    print(json.dumps(answer, indent=2))
    return 0 if answer["loggedIn"] else 1


def rate_limit_event(info):
    return {"type": "rate_limit_event", "rate_limit_info": info, "uuid": str(uuid.uuid4()),
            "session_id": SESSION}


def first_time(name):
    """True for the first run (of a test) that asks; a file in the log dir remembers it."""
    try:
        os.close(os.open(os.path.join(os.environ["FAKE_CLAUDE_LOG"], name),
                         os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def first_line_kills(log_dir):
    """Whether this run dies now: once, for the first run that reads a line after the test
    created $FAKE_CLAUDE_LOG/die-on-line (a CLI killed just as it was handed a request)."""
    try:
        os.unlink(os.path.join(log_dir, "die-on-line"))
        return True
    except FileNotFoundError:
        return False


def alive_peers(log_dir):
    """Other fake runs still running now (they wrote a record and have not exited)."""
    peers = []
    for name in os.listdir(log_dir):
        if name.endswith(".json") and name[:-5] != str(os.getpid()):
            try:
                os.kill(int(name[:-5]), 0)
            except (OSError, ValueError):
                continue
            try:  # an exited, unreaped run is not running
                with open("/proc/%s/stat" % name[:-5]) as f:
                    if f.read().rsplit(")", 1)[1].split()[0] in "ZX":
                        continue
            except OSError:
                pass
            peers.append(int(name[:-5]))
    return peers


def directives(text):
    found = {}
    for name, arg in re.findall(r"\[\[fake:([a-z0-9_]+)(?::([^\]]*))?\]\]", text):
        found[name] = arg
    return found


def scenario(text, model, opts=None):
    """The stdout lines (dicts, and str for raw lines) for one user turn."""
    d = directives(text)
    reply = [w for w in re.split(r"(?=\s)", d["reply"]) if w] if "reply" in d else list(REPLY)
    if "words" in d:
        reply = ["w%d " % i for i in range(int(d["words"]))]
    if "bigdelta" in d:
        reply = ["x" * int(d["bigdelta"])]
    u = usage(12, 9, *( (3, 5) if "cache" in d else (0, 0)))
    if "out_tokens" in d:
        u["output_tokens"] = int(d["out_tokens"])
    lines: list = []  # dicts, and str for raw lines
    if "retry" in d:
        lines.append({"type": "system", "subtype": "api_retry", "attempt": 1, "max_retries": 10,
                      "retry_delay_ms": 606, "error_status": 529, "error": "overloaded",
                      "session_id": SESSION, "uuid": str(uuid.uuid4())})
    if any(k in d for k in ("err401", "err401once", "notloggedin", "err529", "err500", "toolong",
                            "ratelimit", "connrefused", "third_party", "long_context")):
        lines.append(status())  # in stream-json input mode a status line comes first
    if "ratelimit" in d:  # with subscription (OAuth) credentials, before the error
        lines.append(rate_limit_event({"status": "rejected", "resetsAt": int(time.time()) + int(
            d["ratelimit"] or 0), "isUsingOverage": False}))
    if "err401" in d or ("err401once" in d and first_time("auth-refreshed")):
        return lines + api_error("Invalid API key \u00b7 Fix external API key", 401,
                                 "authentication_failed", "authentication_error")
    if "notloggedin" in d:
        return lines + api_error("Not logged in \u00b7 Please run /login", None,
                                 "authentication_failed")
    if "err529" in d:
        return lines + api_error("API Error: 529 Overloaded. This is a server-side issue, usually "
                                 "temporary \u2014 try again in a moment.", 529, "server_error",
                                 "overloaded_error")
    if "err500" in d:
        return lines + api_error("API Error: 500 Internal server error. This is a server-side "
                                 "issue, usually temporary \u2014 try again in a moment.", 500,
                                 "server_error", "api_error")
    if "toolong" in d:
        return lines + api_error("Prompt is too long \u00b7 this conversation is a single "
                                 "exchange and cannot be compacted", 400, "invalid_request",
                                 "invalid_request_error", terminal="prompt_too_long")
    if "ratelimit" in d:
        return lines + api_error("API Error: Request rejected (429) \u00b7 Rate limited", 429,
                                 "rate_limit", "rate_limit_error")
    for name, refusal in (("third_party", THIRD_PARTY), ("long_context", LONG_CONTEXT)):
        if name in d:  # what 2.1.331 prints for the API's 400 (EndToEndTest)
            return lines + api_error("API Error: 400 " + refusal, 400, "unknown",
                                     "invalid_request_error")
    if "connrefused" in d:
        return lines + api_error("API Error: Connection refused \u2014 a firewall or proxy may be "
                                 "blocking it (ECONNREFUSED)", None, "server_error",
                                 extra={"api_error": "connection_failed"})
    if "maxturns" in d:
        return lines + [result(model, "", usage(12, 9), stop_reason="tool_use", is_error=True,
                               subtype="error_max_turns", terminal="max_turns",
                               errors=["Reached maximum number of turns (1)"])]
    blocks = [("text", reply)]
    if "thinking" in d:
        blocks.insert(0, ("thinking", ["Let me think briefly."]))
    # [[fake:call:NAME:JSON]] calls a tool (repeat it for parallel calls); once the transcript
    # holds results, [[fake:then:NAME:JSON]] is the next step; after that the answer quotes
    # the last result.
    results = re.findall(r"<tool_result [^>]*>\n(.*?)\n</tool_result>", text, re.S)
    step = ("call", "then")[len(results)] if len(results) < 2 else None
    calls = re.findall(r"\[\[fake:%s:([A-Za-z0-9_-]+):(\{.*?\})\]\]" % step, text) \
        if step else []
    if results and not calls:
        blocks = [("text", ["Tools said: ", results[-1]])]
        reply = ["Tools said: ", results[-1]]
    structured = re.search(r"\[\[fake:structured:(\{.*?\})\]\]", text)
    if calls or (opts or {}).get("--json-schema"):
        said = blocks if "reply" in d or "thinking" in d or not (calls or structured) else []
        turn = tool_turn(model, said, calls, structured, opts or {}, u)
        if "stall" in d:  # the model's turn ends, and then the CLI takes its time
            turn = turn[:1] + ["STALL"]
        return lines + [status()] + turn
    lines.append(status())
    if "cut" in d:
        return lines + broken_stream(model, blocks, u, int(d["cut"] or 5),
                                     int(d["cuts"]) if d.get("cuts") else None, "differ" in d)
    if "max_tokens" in d or "always_max_tokens" in d:
        return lines + resumed_answer(model, blocks, u, gives_up="always_max_tokens" in d)
    stop_reason = "refusal" if "refusal" in d else "end_turn"
    if "garbage" in d:
        lines += ["this is not json", "[1, 2, 3]", "", "{\"type\": \"something_new\"}",
                  "{\"truncated\": "]
    lines += list(message_events(model, [("text", ["Let me look."])], stop_reason="tool_use",
                                 u=usage(12, 4))) if "twoturns" in d else []
    lines.append(("MESSAGE", model, blocks, stop_reason, u))
    if "ratelimit_info" in d:  # with subscription (OAuth) credentials, before the result
        lines.append(rate_limit_event({"status": "allowed", "isUsingOverage": False}))
    elif subscription_info() is not None:  # what the API's unified headers say, every answer
        lines.append(rate_limit_event(subscription_info()))
    lines.append(result(model, "".join(reply), u, stop_reason=stop_reason))
    return lines


ENFORCE = ("[structured-output-enforce] You MUST call the StructuredOutput tool to complete "
           "this request. Call this tool now.")


def user_line(content, decision=None):
    """A user line; with `decision` ("accept" or "reject"), the result of a tool call."""
    line = {"type": "user", "message": {"role": "user", "content": content},
            "parent_tool_use_id": None, "session_id": SESSION, "uuid": str(uuid.uuid4()),
            "timestamp": "2026-11-24T11:47:55.098Z"}
    if decision:
        result = content[0]
        line["tool_use_result"] = result["content"] if decision == "accept" else \
            "Error: " + result["content"]
        meta = {"id": result["tool_use_id"], "permission_decision": {"decision": decision,
                                                                    "source": "config"}}
        if decision == "reject":
            meta["non_execution_kind"] = "user-rejected"
        line["tool_result_meta"] = [meta]
    return line


def tool_block(name, arguments, after):
    half = len(arguments) // 2
    return ("tool_use", {"id": "toolu_fake" + uuid.uuid4().hex[:20], "name": name,
                         "input": json.loads(arguments), "pieces": [arguments[:half],
                                                                    arguments[half:]],
                         "after": after})


def tool_turn(model, blocks, calls, structured, opts, u):
    """A turn in which the model calls tools, as 2.1.331 prints it (shared/claude-cli/
    r-mcp-tool-bridge, n3-jsonschema and the end-to-end test): each call streams as a tool_use
    block; in dontAsk mode each call of an MCP tool is denied as its block ends
    (system/permission_denied, then a user tool_result), a call of a tool nobody offered gets
    "No such tool"; then --max-turns 1 ends the run (error_max_turns), else the model is
    asked again and answers text. With --json-schema a StructuredOutput call ends the run with
    `structured_output`; an answer without one is nudged once (ENFORCE), then given up."""
    names = [t["name"] for t in MCP_TOOLS]
    blocks, denials = list(blocks), []
    for name, arguments in calls:
        offered = [o for o in names if o == name or o.endswith("__" + name)]
        full = offered[0] if offered else name
        block = tool_block(full, arguments, [])
        call_id = block[1]["id"]
        if offered:
            block[1]["after"] = [
                {"type": "system", "subtype": "permission_denied", "tool_name": full,
                 "tool_use_id": call_id, "decision_reason_type": "mode",
                 "message": DENIED % full, "uuid": str(uuid.uuid4()), "session_id": SESSION}]
            block[1]["later"] = [
                user_line([{"type": "tool_result", "content": DENIED % full, "is_error": True,
                            "tool_use_id": call_id}], "reject")]
            denials.append({"tool_name": full, "tool_use_id": call_id,
                            "tool_input": json.loads(arguments)})
        else:
            block[1]["later"] = [user_line([{"type": "tool_result", "content": (
                "<tool_use_error>Error: No such tool available: %s</tool_use_error>" % full),
                "is_error": True, "tool_use_id": call_id}])]
        blocks.append(block)
    if structured and opts.get("--json-schema"):
        value = json.loads(structured.group(1))
        block = tool_block("StructuredOutput", structured.group(1), [])
        block[1]["later"] = [user_line([{"tool_use_id": block[1]["id"], "type": "tool_result",
                                         "content": "Structured output provided successfully"}],
                                       "accept")]
        blocks.append(block)
    stop = "tool_use" if any(kind == "tool_use" for kind, _ in blocks) else "end_turn"
    lines = [("MESSAGE", model, blocks, stop, u)]
    if structured and opts.get("--json-schema") and not calls:
        r = result(model, json.dumps(value, separators=(",", ":")), u, stop_reason="tool_use")
        r["num_turns"] = 2
        r["structured_output"] = value
        return lines + [r]
    if opts.get("--max-turns") == "1":
        r = result(model, "", u, stop_reason=stop, is_error=True, subtype="error_max_turns",
                   terminal="max_turns", errors=["Reached maximum number of turns (1)"])
        r.update({"permission_denials": denials, "num_turns": 2,
                  "begun_message_ids": ["msg_fake_" + uuid.uuid4().hex[:20]]})
        if not calls and opts.get("--json-schema"):
            lines.append(synthetic_user(ENFORCE))  # the nudge, then the limit
        return lines + [r]
    if not calls:  # --json-schema, answered with text: nudged once
        lines += [synthetic_user(ENFORCE), status(), lines[0]]
    else:  # the CLI asks the model again with the denials
        lines += [status(), ("MESSAGE", model, [("text", REPLY)], "end_turn", u)]
    r = result(model, "".join(REPLY) if calls else "".join(blocks[-1][1]) if blocks else "",
               u)
    r.update({"permission_denials": denials, "num_turns": 2})
    return lines + [r]


RESUME = ("Output token limit hit. Resume directly \u2014 no apology, no recap of what you were "
          "doing. Pick up mid-thought if that is where the cut happened. Break remaining work "
          "into smaller pieces.")
CONTINUATION = [" And", " the", " rest."]


def resumed_answer(model, blocks, u, gives_up):
    """What 2.1.331 does when a message stops at max_tokens (seen in the end-to-end test): a
    synthetic user line asks the model to resume, up to three times; then it gives up with an
    error result whose api_error is "max_output_tokens"."""
    lines = []
    for attempt in range(4 if gives_up else 2):
        if attempt:
            lines.append({"type": "user", "message": {"role": "user", "content": [
                {"type": "text", "text": RESUME}]}, "parent_tool_use_id": None,
                "session_id": SESSION, "uuid": str(uuid.uuid4()),
                "timestamp": "2026-11-25T10:41:41.261Z", "isSynthetic": True})
            lines.append(status())
        last = attempt == 1 and not gives_up
        lines.append(("MESSAGE", model, [("text", CONTINUATION)] if last else blocks,
                      "end_turn" if last else "max_tokens", u))
    if not gives_up:
        return lines + [result(model, "".join(CONTINUATION), u)]
    limit = os.environ.get("CLAUDE_CODE_MAX_OUTPUT_TOKENS", "32000")
    text = ("API Error: Claude's response exceeded the %s output token maximum. To configure "
            "this behavior, set the CLAUDE_CODE_MAX_OUTPUT_TOKENS environment variable." % limit)
    assistant_line, _ = api_error(text, None, "max_output_tokens", extra={
        "api_error": "max_output_tokens", "api_error_params": {"cut": "output_limit"}})
    r = result(model, text, u, stop_reason="stop_sequence", terminal="api_error")
    del r["ttft_ms"], r["ttft_stream_ms"], r["time_to_request_ms"], r["first_content_frame_ms"]
    r.update({"is_error": True, "num_turns": 4, "api_error": "max_output_tokens"})
    return lines + [assistant_line, r]


CUT_RESUME = ("Your response above was cut off mid-stream. Resume directly from where it stops "
              "\u2014 no apology, no recap. If none of it survived, answer the request from the "
              "start.")


def synthetic_user(text):
    return {"type": "user", "message": {"role": "user", "content": [{"type": "text",
                                                                     "text": text}]},
            "parent_tool_use_id": None, "session_id": SESSION, "uuid": str(uuid.uuid4()),
            "timestamp": "2026-12-01T07:20:11.136Z", "isSynthetic": True}


def dropped_message(model, blocks, cut_after):
    """An API message whose stream breaks after `cut_after` text pieces, as 2.1.331 prints it:
    finished blocks as usual, the broken one ended with content_block_stop, then message_stop
    naming the first abandoned block (shared/claude-cli/p-midstream-cut-*). (lines, its id,
    the index of the broken block)."""
    lines = list(message_events(model, blocks, u=usage(12, 1)))
    message_id = lines[0]["api_message_id"]
    out, sent = [], 0
    for line in lines:
        inner = line.get("event") or {}
        index = inner.get("index")
        if inner.get("type") == "content_block_delta" and "text" in inner["delta"]:
            if sent == cut_after:
                out.append(stream({"type": "content_block_stop", "index": index}, message_id))
                out.append(stream({"type": "message_stop"}, message_id, abandoned_blocks={
                    "api_message_id": message_id, "from_block_index": index}))
                return out, message_id, index
            sent += 1
        out.append(line)
    raise ValueError("the answer is shorter than the cut")


def broken_stream(model, blocks, u, cut_after, cuts, differ):
    """What 2.1.331 does when the API stream breaks mid-answer (seen in the end-to-end test
    and shared/claude-cli/p-midstream-cut-*): with nothing finished, it streams the turn again
    once after system/api_retry (once, whatever CLAUDE_CODE_MAX_RETRIES above 0 says), then
    fetches it whole and prints it as one assistant message; when finished blocks (thinking)
    survived, it asks the model to resume with a synthetic user line, three times at most,
    then gives up.
    The first `cuts` streams break (all of them when None); `differ`: later calls answer other
    words."""
    retries = int(os.environ.get("CLAUDE_CODE_MAX_RETRIES") or 10)
    lines, begun, used, resumes, call = [], [], 0, 0, 0
    total = usage(0, 0)
    while True:
        call += 1
        words = [(kind, [p.replace("w", "v", 1) for p in pieces] if differ and call > 1
                  else pieces) for kind, pieces in blocks]
        if cuts is not None and call > cuts:
            lines.append(("MESSAGE", model, words, "end_turn", u))
            break
        dropped, message_id, index = dropped_message(model, words, cut_after)
        lines += dropped
        begun.append(message_id)
        for key in ("input_tokens", "output_tokens"):
            total[key] += usage(12, 1)[key]
        if index > 0:  # finished blocks survived: the model is asked to resume
            if resumes == 3:
                text = "API Error: Connection lost mid-response. The response above may be " \
                       "incomplete."
                return lines + api_error(text, None, "server_error",
                                         extra={"api_error": "connection_failed"})
            resumes += 1
            lines += [synthetic_user(CUT_RESUME), status()]
        elif used < min(retries, 1):
            used += 1
            lines.append({"type": "system", "subtype": "api_retry", "attempt": used,
                          "max_retries": retries, "retry_delay_ms": 544, "error_status": None,
                          "error": "unknown", "session_id": SESSION, "uuid": str(uuid.uuid4())})
        else:  # fetched whole, without streaming
            call += 1
            content = [{"type": "text", "text": "".join(p)} if kind == "text" else
                       {"type": "thinking", "thinking": "".join(p), "signature": "fakesig=="}
                       for kind, p in [(k, [q.replace("w", "v", 1) for q in ps] if differ
                                        else ps) for k, ps in blocks]]
            whole = assistant("msg_fake_" + uuid.uuid4().hex[:20], model, content[0],
                              full_usage(u))
            whole["message"].update({"content": content, "stop_reason": "end_turn"})
            lines.append(whole)
            break
    for key in ("input_tokens", "output_tokens"):
        total[key] += u[key]
    final = "".join(lines[-1]["message"]["content"][-1]["text"] if isinstance(lines[-1], dict)
                    else "".join(words[-1][1]))
    r = result(model, final, total)
    r["begun_message_ids"] = begun + ([] if isinstance(lines[-1], dict) else ["msg_fake_last"])
    return lines + [r]


def emit(line, pause=0.0, forever=False):
    if isinstance(line, tuple):
        _, model, blocks, stop_reason, u = line
        for event in message_events(model, blocks, stop_reason, u, pause, forever):
            out(event)
    elif line == "STALL":
        time.sleep(3600)
    elif isinstance(line, str):
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    else:
        out(line)


def start_mcp_servers(opts):
    """Start the stdio servers of --mcp-config (none with --safe-mode, as 2.1.331), say
    initialize and list their tools into MCP_TOOLS, as the real CLI does before its first
    request; they stay up until this process ends (their stdin then closes)."""
    if not opts.get("--mcp-config") or opts.get("--safe-mode"):
        return []
    config = json.loads(opts["--mcp-config"])
    servers = []
    for name, spec in sorted(config["mcpServers"].items()):
        server = subprocess.Popen([spec["command"]] + spec.get("args", []),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  env=dict(os.environ, **spec.get("env", {})))
        servers.append(server)

        def ask(method, params, id_):
            message = {"jsonrpc": "2.0", "method": method, "params": params}
            if id_ is not None:
                message["id"] = id_
            server.stdin.write((json.dumps(message) + "\n").encode())
            server.stdin.flush()
            if id_ is None:
                return None
            answer = json.loads(server.stdout.readline())
            if answer.get("id") != id_:
                fail("fake claude: MCP server %s answered id %r for %r" % (name, answer.get(
                    "id"), id_))
            return answer

        # What 2.1.331 sends first (seen with a logging server): a probe that servers of the
        # older protocol refuse, then initialize.
        ask("server/discover", {}, "server-discover-probe-1")
        reply = ask("initialize", {"protocolVersion": "2025-11-25", "capabilities": {
            "roots": {"listChanged": True}}, "clientInfo": {"name": "claude-code",
                                                            "version": VERSION.split()[0]}}, 0)
        if "result" not in reply:
            fail("fake claude: MCP server %s failed to initialize: %r" % (name, reply))
        ask("notifications/initialized", {}, None)
        listed = ask("tools/list", {}, 1)["result"]["tools"]
        called = ask("tools/call", {"name": listed[0]["name"], "arguments": {}}, 2) \
            if listed and os.environ.get("FAKE_CLAUDE_CALL_TOOLS") else None
        for tool in listed:
            MCP_TOOLS.append({"server": name, "name": "mcp__%s__%s" % (name, tool["name"]),
                              "description": tool.get("description", ""),
                              "input_schema": tool.get("inputSchema"),
                              "called": called and called.get("result")})
    return servers


UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
NO_RESPONSE = "No response requested."
CONTINUE = "Continue from where you left off."


def session_path(session_id):
    """Where 2.1.331 keeps a session of the working directory (s1-*, s-sessions.sh)."""
    config = os.environ.get("CLAUDE_CONFIG_DIR") or os.path.join(os.path.expanduser("~"),
                                                                 ".claude")
    return os.path.join(config, "projects", re.sub(r"[^A-Za-z0-9]", "-", os.getcwd()),
                        session_id + ".jsonl")


def preamble_rows(model):
    """The attachment rows 2.1.331 writes after a fresh session's first user row
    (shared/claude-cli/s1-session-written-by-cli.jsonl), and sends as one system message."""
    cwd, today = os.getcwd(), time.strftime("%Y-%m-%d")
    environment = ("# Environment\nYou have been invoked in the following environment: \n"
                   " - Primary working directory: %s\n - Is a git repository: false\n"
                   " - Platform: linux\n - Shell: bash\n - OS Version: Linux 6.18" % cwd)
    identity = ("You are powered by the model named %s. The exact model ID is %s." % (
        model, model))
    reminder = lambda text: [{"content": "<system-reminder>\n%s\n</system-reminder>" % text}]
    return [
        {"type": "attachment", "attachment": {"type": "environment", "snapshot": {
            "workingDirectory": cwd, "isWorktree": False, "isGitRepo": False,
            "additionalWorkingDirectories": [], "platform": "linux", "shell": "bash",
            "osVersion": "Linux 6.18"}}, "rendered": reminder(environment),
         "renderedRole": "system"},
        {"type": "attachment", "attachment": {"type": "model", "identity": {
            "modelId": model, "marketingName": model, "knowledgeCutoff": "June 2026"},
            "text": identity}, "rendered": reminder(identity), "renderedRole": "system"},
        {"type": "attachment", "attachment": {"type": "session_context", "context": {}}},
        {"type": "attachment", "attachment": {"type": "date", "date": today},
         "rendered": reminder("Today's date is %s." % today), "renderedRole": "system"},
        {"type": "attachment", "attachment": {"type": "prompt_snapshot",
                                              "systemPrompt": ["(the system prompt)"]}}]


def rendered(rows):
    """Attachment rows as the one system message 2.1.331 makes of them."""
    texts = [part["content"] for row in rows for part in row.get("rendered") or []]
    return "\n\n".join(re.sub(r"^<system-reminder>\n|\n</system-reminder>$", "", t)
                       for t in texts)


def api_messages(rows, new, resume_turn, model):
    """The messages 2.1.331 sends for a session's rows and the stdin user turns `new` (None:
    nothing to do): rows as they are, the attachments' system message after the first user
    row (else after everything), a file ending with a user row answered "No response
    requested." before a new line, or resumed with CONTINUE added when it holds tool results
    (RESUME_TURN env); tool_result blocks on stdin dropped; consecutive user messages merged,
    the first one's last text gaining a newline (seen in the end-to-end test)."""
    messages, attachments = [], []
    for row in rows:
        if row.get("type") == "attachment" and row.get("rendered"):
            attachments.append(row)
        elif row.get("type") in ("user", "assistant"):
            content = row["message"]["content"]  # a string stays one (s2-api-request)
            messages.append({"role": row["type"], "content": content if isinstance(
                content, str) else list(content)})
    if messages and messages[-1]["role"] == "user":
        if new:
            messages.append({"role": "assistant", "content": [{"type": "text",
                                                               "text": NO_RESPONSE}]})
        elif not resume_turn:
            return None
        elif any(b.get("type") == "tool_result" for b in blocks_of(messages[-1]["content"])):
            messages.append({"role": "user", "content": [{"type": "text", "text": CONTINUE}]})
    elif not new:
        return None
    for content in new:
        messages.append({"role": "user", "content": content if isinstance(content, str) else
                         [b for b in content if b.get("type") != "tool_result"]})
    merged = []
    for message in messages:
        if merged and message["role"] == merged[-1]["role"] == "user":
            last = blocks_of(merged[-1]["content"])
            if last and last[-1].get("type") == "text":
                last[-1] = dict(last[-1], text=last[-1]["text"] + "\n")
            merged[-1] = {"role": "user", "content": last + blocks_of(message["content"])}
        else:
            merged.append(message)
    system = {"role": "system", "content": rendered(attachments or preamble_rows(model))}
    firsts = [i for i, m in enumerate(merged) if m["role"] == "user"]
    if attachments and firsts:
        merged.insert(firsts[0] + 1, system)
    else:
        merged.append(system)
    return merged


def blocks_of(content):
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def conversation_text(messages):
    """What the directives are read from: every user message's text, tool results as the
    transcript writes them."""
    parts = []
    for message in messages:
        if message["role"] != "user":
            continue
        for block in blocks_of(message["content"]):
            if block.get("type") == "text":
                parts.append(block["text"])
            elif block.get("type") == "tool_result":
                content = block.get("content")
                text = content if isinstance(content, str) else "".join(
                    b.get("text", "") for b in content or [])
                parts.append('<tool_result tool_call_id="%s">\n%s\n</tool_result>' % (
                    block.get("tool_use_id"), text))
    return " ".join(parts)


def main():
    argv = sys.argv[1:]
    if argv in (["--version"], ["-v"]):
        print(VERSION)
        return 0
    if argv == ["auth", "status", "--json"]:
        return auth_status()
    opts, prompt = parse(argv)
    if not (opts.get("-p") or opts.get("--print")):
        fail("fake claude: only print mode is faked")
    fmt = opts.get("--output-format", "text")
    if fmt not in ("text", "json", "stream-json"):
        fail("error: option '--output-format <format>' argument '%s' is invalid. Allowed "
             "choices are text, json, stream-json." % fmt)
    if fmt == "stream-json" and not opts.get("--verbose"):
        fail("Error: When using --print, --output-format=stream-json requires --verbose")
    if opts.get("--input-format") == "stream-json" and fmt != "stream-json":
        fail("Error: --input-format=stream-json requires output-format=stream-json.")
    if opts.get("--input-format") != "stream-json" or fmt != "stream-json":
        fail("fake claude: only stream-json in and out is faked")
    # As 2.1.331 does before it reads stdin: it loads a resumed session (a missing one ends it
    # at once) and starts its MCP servers. FAKE_CLAUDE_START_DELAY: the time the real one takes.
    session_id = opts.get("--resume") or opts.get("--session-id")
    if session_id and not UUID.fullmatch(session_id):
        fail("Error: Invalid session ID. Must be a valid UUID.")
    rows, session = [], None
    if session_id:
        path = session_path(session_id)
        if opts.get("--resume"):
            if os.environ.get("FAKE_CLAUDE_NO_SESSIONS") or not os.path.exists(path):
                log_dir = os.environ.get("FAKE_CLAUDE_LOG")
                if log_dir:  # what was tried, for the tests
                    with open(os.path.join(log_dir, "%d.json" % os.getpid()), "w") as f:
                        json.dump({"pid": os.getpid(), "started": time.time(), "argv": argv,
                                   "refused": True}, f)
                fail("No conversation found with session ID: %s" % session_id)
            with open(path, encoding="utf-8") as f:
                text = f.read()
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            session = {"path": path, "text": text, "rows": rows,
                       "mode": os.stat(path).st_mode & 0o777,
                       "dir_mode": os.stat(os.path.dirname(path)).st_mode & 0o777}
        elif os.path.exists(path):
            fail("Error: Session ID %s is already in use." % session_id)
    servers = start_mcp_servers(opts)
    if opts.get("--safe-mode"):
        out(ui_invalidate())  # printed at start, before stdin is read (a warm CLI's too)
    log_dir = os.environ.get("FAKE_CLAUDE_LOG")
    if log_dir and os.path.exists(os.path.join(log_dir, "die-at-start")):  # a broken install
        sys.stderr.write("fake claude: cannot start (a broken install)\n")
        return 1
    time.sleep(float(os.environ.get("FAKE_CLAUDE_START_DELAY") or 0))
    turns, controls, system_text = [], [], None
    # Line by line, as the real one: a control request (the Agent SDK's) is answered at once,
    # before the next line is read. FAKE_CLAUDE_NO_CONTROL: a CLI without them (silence, as
    # 2.1.331 gives a subtype it does not know).
    for raw in sys.stdin:
        if not raw.strip():
            continue
        if log_dir and first_line_kills(log_dir):  # died as it was handed its request
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            line = json.loads(raw)
        except ValueError:
            fail("Error parsing streaming input line (type=unknown, %d chars): SyntaxError"
                 % len(raw))
        if line.get("type") != "control_request":
            turns.append(line)
            continue
        if os.environ.get("FAKE_CLAUDE_NO_CONTROL"):
            continue
        request = line["request"]
        controls.append(request)
        response = {"subtype": "success", "request_id": line["request_id"]}
        if request.get("subtype") == "initialize":  # as shared/claude-cli/d6-* (2.1.331)
            if "appendSystemPrompt" in request:
                system_text = request["appendSystemPrompt"]
            response["response"] = {
                "commands": [], "agents": [], "output_style": "default",
                "available_output_styles": [], "user_output_styles_dir": os.path.expanduser(
                    "~/.claude/output-styles"), "models": [], "account": {
                        "tokenSource": "none", "apiKeySource": "ANTHROPIC_API_KEY",
                        "apiProvider": "firstParty"}, "pid": os.getpid(),
                "claude_code_version": VERSION.split()[0], "current_permission_mode":
                    opts.get("--permission-mode", "default"), "hook_on_failure_supported": True,
                "hooks_when_unanswered_kept": 0, "other_hook_ask_outranks_host": True,
                "feedback_mode": {"kind": "disabled"}, "analytics_disabled": True,
                "sandbox_enabled": False, "remote_control_auto_enable": False,
                "remote_control_auto_connect_default": False, "remote_control_available": False,
                "remote_control_auto_on_by_default": False, "ide_rc_auto_enable_gate": False,
                "fast_mode_state": "off", "fast_mode_disabled_reason": "sdk_opt_in_required",
                "session_state": "idle", "capabilities": []}
            response.update(pending_permission_requests=[], pending_user_dialog_requests=[])
        elif request.get("subtype") == "set_model":  # as 2.1.331 answers it (by experiment)
            opts["--model"] = request.get("model")
            response["response"] = {"model": resolve(opts["--model"])}
        out({"type": "control_response", "response": response})
    read_at = time.time()
    if not turns and not prompt and not opts.get("--resume"):
        fail("Error: Input must be provided either through stdin or as a prompt argument "
             "when using --print")
    messages = api_messages(rows, [t["message"]["content"] for t in turns],
                            os.environ.get("CLAUDE_CODE_RESUME_INTERRUPTED_TURN") == "1",
                            resolve(opts.get("--model")))
    if messages is None:
        return 0  # a resumed session with nothing to do: 2.1.331 prints nothing either
    system_file = opts.get("--append-system-prompt-file")
    if system_text is None and system_file:
        with open(system_file, encoding="utf-8") as f:
            system_text = f.read()
    log_dir = os.environ.get("FAKE_CLAUDE_LOG")
    record = {"pid": os.getpid(), "started": time.time(),
              "read_at": read_at, "controls": controls, "model": resolve(opts.get("--model")),
              "peers": alive_peers(log_dir) if log_dir else [],
              "argv": argv, "cwd": os.getcwd(),
              "cwd_entries": sorted(os.listdir(".")), "stdin": turns,
              "messages": messages, "session": session,
              "system": system_text or None,
              "env": {k: os.environ.get(k) for k in ("CLAUDE_CODE_MAX_OUTPUT_TOKENS",
                                                     "CLAUDECODE",
                                                     "CLAUDE_CODE_DISABLE_AUTO_MEMORY",
                                                     "CLAUDE_CODE_RESUME_INTERRUPTED_TURN")}}
    texts = [conversation_text(messages)]
    d = directives(texts[0])
    if "child" in d:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        record["child"] = child.pid
    if log_dir:
        path = os.path.join(log_dir, "%d.json" % os.getpid())
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)
    if "hang" in d:
        time.sleep(3600)
    if "exit" in d:
        sys.stderr.write("fake claude: something broke before answering\n")
        return int(d["exit"] or 2)
    model = resolve(opts.get("--model"))
    if opts.get("--session-id") and not opts.get("--no-session-persistence"):
        # A fresh session, persisted as 2.1.331 does: the user row, then the attachments.
        chain, rows = None, []
        for row in [{"type": "queue-operation", "operation": "enqueue"},
                    {"type": "user", "message": {"role": "user",
                                                 "content": turns[0]["message"]["content"]}}] \
                + preamble_rows(model):
            if row["type"] != "queue-operation":
                row.update({"parentUuid": chain, "uuid": str(uuid.uuid4()),
                            "isSidechain": False, "cwd": os.getcwd(), "version": "2.1.331"})
                chain = row["uuid"]
            row["sessionId"] = session_id
            rows.append(row)
        os.makedirs(os.path.dirname(session_path(session_id)), 0o700, exist_ok=True)
        with open(os.open(session_path(session_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                          0o600), "w") as f:
            f.write("".join(json.dumps(row) + "\n" for row in rows))
    if log_dir and servers:
        record["mcp_tools"] = list(MCP_TOOLS)
        record["mcp_pids"] = [server.pid for server in servers]
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)
    out(init_line(opts, model))
    if "silent" in d:
        time.sleep(3600)
    if "gate" in d:  # answer once the test creates $FAKE_CLAUDE_LOG/<name>
        while not os.path.exists(os.path.join(log_dir, d["gate"])):
            time.sleep(0.01)
    pause = float(d.get("drip") or d.get("slow") or 0)
    for text in texts:
        lines = scenario(text, model, opts)
        for line in lines:
            if "diemid" in d and isinstance(line, dict) and line.get("type") == "result":
                sys.stderr.write("fake claude: fatal: lost the connection mid-stream\n")
                return 3
            emit(line, pause, forever="drip" in d)
    return 1 if lines and isinstance(lines[-1], dict) and lines[-1].get("is_error") else 0


if __name__ == "__main__":
    sys.exit(main())
'''


def load_fake():
    """FAKE_CLAUDE as a module, so unit tests can use its line builders."""
    module = types.ModuleType("fake_claude")
    exec(compile(FAKE_CLAUDE, "fake_claude", "exec"), module.__dict__)
    return module


fake = load_fake()


def fake_lines(text, model="claude-opus-5-5"):
    """The dict lines the fake prints for one prompt (message tuples expanded)."""
    lines = []
    for line in fake.scenario(text, model):
        if isinstance(line, tuple):
            _, model_, blocks, stop_reason, u = line
            lines.extend(fake.message_events(model_, blocks, stop_reason, u))
        elif isinstance(line, dict):
            lines.append(line)
    return lines


# Verbatim from shared/claude-cli/e1-err401-streamjson.stdout (claude 2.1.331): the result line.
REAL_401_RESULT = (
    '{"duration_api_ms":0,"stop_reason":"stop_sequence","session_id":"00a3e98a-8304-4208-8163-'
    '8c62ce272529","total_cost_usd":0,"usage":{"output_tokens_details":{"thinking_tokens":0},'
    '"input_tokens":0,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,'
    '"output_tokens":0,"server_tool_use":{"web_search_requests":0,"web_fetch_requests":0},'
    '"service_tier":"standard","cache_creation":{"ephemeral_1h_input_tokens":0,'
    '"ephemeral_5m_input_tokens":0},"inference_geo":"","iterations":[],"speed":"standard",'
    '"fallback_credit":null},"modelUsage":{},"permission_denials":[],"terminal_reason":'
    '"api_error","fast_mode_state":"off","fast_mode_disabled_reason":"sdk_opt_in_required",'
    '"safety_stops":0,"is_error":true,"num_turns":1,"subtype":"success","api_error_status":401,'
    '"api_error_type":"authentication_error","result":"Invalid API key \\u00b7 Fix external API '
    'key","type":"result","duration_ms":68,"uuid":"86d7dfd3-b94d-4664-a698-8726b61e3f4e",'
    '"queued_turn_count":0,"result_index":0,"model_usage_since_last_result":{}}')
# Verbatim from shared/claude-cli/o-auth-CLAUDE_CODE_OAUTH_TOKEN.stdout.
REAL_RATE_LIMIT_EVENT = (
    '{"type":"rate_limit_event","rate_limit_info":{"status":"allowed","isUsingOverage":false},'
    '"uuid":"b8c920db-75fe-4495-978d-57fd19a7b966","session_id":"3da9fff8-c137-4e62-a2c6-'
    '57c25323b28d"}')


##############################################################################
# Helpers
##############################################################################

def wait_until(condition, timeout=10.0, what="condition"):
    """Poll `condition` until it holds; fail after `timeout` s. Waits for a fact, not a time."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.01)


def alive(pid):
    """Whether a process exists and is not a zombie."""
    if not proxy.pid_alive(pid):
        return False
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True


def children_of(pid):
    """Direct children (any state) of `pid`, from /proc; None where /proc is missing."""
    if not os.path.isdir("/proc"):
        return None
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append((int(entry), fields[0]))
    return found


def sent(run, role=None, kind=None):
    """The blocks the fake CLI would have sent the API in `run` (its `messages`), of `role`
    messages and `kind` blocks when given."""
    return [block for message in run["messages"] if role in (None, message["role"])
            for block in (message["content"] if isinstance(message["content"], list) else
                          [{"type": "text", "text": message["content"]}])
            if kind in (None, block.get("type"))]


def session_files(home=None, p=None):
    """Files under $HOME/.claude/projects (where the CLI keeps sessions), once the runs of
    proxy `p` (if given) have ended."""
    if p is not None:
        wait_until(lambda: not p.server.processes, what="the CLI runs to end")
    root = os.path.join(home or os.environ["HOME"], ".claude", "projects")
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files)


def in_parallel(function, arguments, timeout=120):
    """function(a) for each of `arguments`, each in a thread of its own, all at once: the
    exceptions they raised (to be asserted in the test's own thread)."""
    failures = []

    def run(argument):
        try:
            function(argument)
        except Exception as e:
            failures.append(e)

    threads = [threading.Thread(target=run, args=(a,)) for a in arguments]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return failures


def uuid_hex():
    return os.urandom(8).hex()


def open_fds():
    for where in ("/proc/self/fd", "/dev/fd"):
        if os.path.isdir(where):
            return len(os.listdir(where))
    return None


def settings(**overrides):
    """The daemon's defaults, as parse_args gives them, with `overrides`."""
    with mock.patch.dict(os.environ, {k: "" for k in os.environ if k.startswith("CLAUDE_MAX_API")}):
        values = proxy.parse_args(["--port", "0", "--timeout", "30", "--idle-timeout", "30",
                                   "--log-level", "WARNING"])
    values.warm = 0  # WarmTest and the tests that say so start CLIs ahead of requests
    for name, value in overrides.items():
        assert hasattr(values, name), name
        setattr(values, name, value)
    return values


class Proxy:
    """A real ProxyServer on an ephemeral port, serving in a thread."""

    def __init__(self, **overrides):
        self.server = proxy.ProxyServer(("127.0.0.1", 0), settings(**overrides))
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.server.end_all_processes()
        self.thread.join(10)
        self.server.remove_workdir()

    def connect(self, timeout=30):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method, path, body=None, headers=None, raw=None):
        """(status, headers, parsed JSON or raw bytes)."""
        conn = self.connect()
        try:
            hdrs = {"Content-Type": "application/json"}
            hdrs.update(headers or {})
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                                else None)
            conn.request(method, path, body=data, headers=hdrs)
            response = conn.getresponse()
            payload = response.read()
            try:
                parsed = json.loads(payload)
            except ValueError:
                parsed = payload
            return response.status, response, parsed
        finally:
            conn.close()

    def chat(self, content="hi", **fields):
        body = {"model": "claude-sonnet-4", "messages": [{"role": "user", "content": content}]}
        body.update(fields)
        return self.request("POST", "/v1/chat/completions", body)

    def stream(self, content="hi", **fields):
        """(status, response, SSE data payloads parsed (and '[DONE]'), or the JSON error)."""
        body = {"model": "claude-sonnet-4", "stream": True,
                "messages": [{"role": "user", "content": content}]}
        body.update(fields)
        conn = self.connect()
        try:
            conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                return response.status, response, json.loads(response.read())
            return 200, response, parse_sse(response.read())
        finally:
            conn.close()


def send_chat(port, body):
    """A chat request on a raw socket, left open: the test decides when the client hangs up."""
    s = socket.create_connection(("127.0.0.1", port))
    data = json.dumps(body).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
              b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
    return s


def read_response(sock):
    """(status, response, body parsed as JSON when it is JSON) of the answer on `sock`, which
    is closed afterwards."""
    with sock:
        response = http.client.HTTPResponse(sock)
        response.begin()
        body = response.read()
    try:
        return response.status, response, json.loads(body)
    except ValueError:
        return response.status, response, body


def raw_request(port, method="GET", path="/v1/models", headers=(("Host", "127.0.0.1"),),
                body=b"", version="HTTP/1.1", data=None):
    """Send exactly these bytes (or `data`), then read the answer: (status, response, body)."""
    if data is None:
        data = b"%s %s %s\r\n%s\r\n%s" % (
            method.encode("latin-1"), path.encode("latin-1"), version.encode(),
            b"".join(b"%s: %s\r\n" % (k.encode("latin-1"), v.encode("latin-1"))
                     for k, v in headers), body)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        return read_response(s)


def chat_body(content="hi", **fields):
    body = {"model": "opus", "messages": [{"role": "user", "content": content}]}
    body.update(fields)
    return body


def messages_to_prompt(messages):
    """(system text, the CLI's user turn) for Chat Completions `messages`."""
    system, turns = proxy.chat_turns(messages)
    return system, proxy.prompt_content(turns)


def chat_request(content="hi", **fields):
    return proxy.parse_chat_request(chat_body(content, **fields))


def launch_for(prompt, claude="/bin/claude", user_settings=False, **fields):
    """The Launch the proxy makes for a Chat request with this prompt."""
    return proxy.Launch(claude, chat_request(prompt, **fields), user_settings)


def collected(events, request=None):
    """Events folded into a chat.completion, as a request that does not stream gets them."""
    answer = proxy.ChatAnswer(request or chat_request(), "c", streaming=False)
    for event in events:
        answer.feed(event)
    return answer.body()


def parse_sse(data):
    events = []
    for block in data.decode("utf-8").split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


class FakeClaudeMixin:
    """Writes the fake `claude` to a temp dir, puts it first on PATH, records its runs."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp(prefix="proxy-test-")
        cls.bin_dir = os.path.join(cls.tmp, "bin")
        cls.log_dir = os.path.join(cls.tmp, "runs")
        os.mkdir(cls.bin_dir)
        os.mkdir(cls.log_dir)
        cls.home = os.path.join(cls.tmp, "home")  # the fake's sessions go under it
        os.mkdir(cls.home)
        cls.fake_path = os.path.join(cls.bin_dir, "claude")
        with open(cls.fake_path, "w") as f:
            f.write("#!%s\n%s" % (sys.executable, FAKE_CLAUDE))
        os.chmod(cls.fake_path, 0o755)
        cls.env_patch = mock.patch.dict(os.environ, {
            "PATH": cls.bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "FAKE_CLAUDE_LOG": cls.log_dir, "HOME": cls.home,
            # A subscription login, the proxy's case (the fake's `auth status` reads it).
            "CLAUDE_CODE_OAUTH_TOKEN": "sk-ant-oat01-fake"})
        cls.env_patch.start()
        for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"):
            os.environ.pop(name, None)  # restored with the rest by env_patch.stop()
        # A temp dir of the tests' own, for daemons in this process and the ones they start:
        # the state daemons share there (the subscription's, the preambles) is not the user's.
        cls.temp_dir = os.path.join(cls.tmp, "tmp")
        os.mkdir(cls.temp_dir)
        os.environ["TMPDIR"] = cls.temp_dir
        cls.temp_patch = mock.patch.object(tempfile, "tempdir", cls.temp_dir)
        cls.temp_patch.start()

    @classmethod
    def tearDownClass(cls):
        cls.temp_patch.stop()
        cls.env_patch.stop()
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    def setUp(self):
        for name in os.listdir(self.log_dir):
            os.unlink(os.path.join(self.log_dir, name))

    def own_temp_dir(self, prefix):
        """A temp dir for this test alone, where its daemons keep what they share (preambles
        learnt, the subscription's state)."""
        self.tmp_root = tempfile.mkdtemp(prefix=prefix)
        self.addCleanup(shutil.rmtree, self.tmp_root, True)
        patch = mock.patch.object(tempfile, "tempdir", self.tmp_root)
        patch.start()
        self.addCleanup(patch.stop)

    def runs(self):
        """Records of the fake's runs since setUp, oldest first."""
        records = []
        for name in os.listdir(self.log_dir):
            if name.endswith(".json"):
                with open(os.path.join(self.log_dir, name)) as f:
                    records.append(json.load(f))
        return sorted(records, key=lambda r: r["started"])

    def only_run(self):
        runs = self.runs()
        self.assertEqual(len(runs), 1, runs)
        return runs[0]

    def start_proxy(self, **overrides):
        overrides.setdefault("claude_bin", self.fake_path)
        p = Proxy(**overrides)
        self.addCleanup(p.close)
        return p

    def assert_no_cli_left(self, p, runs=None):
        """Every CLI run (and any child it started: a process, the bridge) is gone, and
        nothing is left unreaped."""
        for run in runs if runs is not None else self.runs():
            wait_until(lambda: not alive(run["pid"]), what="fake claude %d to end" % run["pid"])
            if "child" in run:
                wait_until(lambda: not alive(run["child"]), what="its child to end")
            for pid in run.get("mcp_pids", []):
                wait_until(lambda: not alive(pid), what="its MCP server %d to end" % pid)
        wait_until(lambda: not p.server.processes, what="the proxy to forget its processes")
        kids = children_of(os.getpid())
        if kids is not None:
            self.assertEqual([k for k in kids if k[1] == "Z"], [], "zombie children")


##############################################################################
# Pure functions
##############################################################################

class ModelTest(unittest.TestCase):
    def test_family_names_map_to_cli_aliases(self):
        for name, alias in [("claude-opus-4", "opus"), ("claude-sonnet-4", "sonnet"),
                            ("claude-haiku-4", "haiku"), ("opus", "opus"), ("Sonnet", "sonnet"),
                            ("haiku", "haiku")]:
            self.assertEqual(proxy.resolve_model(name)[1], alias, name)

    def test_full_ids_pass_through(self):
        for name in ["claude-sonnet-4-5", "claude-opus-4-1-20250805", "claude-3-5-haiku-20241022",
                     "claude-3-7-sonnet-latest", "claude-opus-4-5", "claude-sonnet-4-5[1m]"]:
            self.assertEqual(proxy.resolve_model(name), (name, name))

    def test_provider_prefixes_are_stripped(self):
        for prefix in ["openai/", "anthropic/", "claude-code-cli/", "claude-max/"]:
            self.assertEqual(proxy.resolve_model(prefix + "claude-opus-4"), ("claude-opus-4", "opus"))
            self.assertEqual(proxy.resolve_model(prefix + "claude-sonnet-4-5")[1],
                             "claude-sonnet-4-5")

    def test_unknown_models_are_404_listing_the_accepted_names(self):
        for name in ["gpt-4o", "claude", "claude-2", "claude-opus", "my-custom-model",
                     "opus; rm -rf /", "--help", "anthropic/gpt-4", "claude-sonnet-4-5 --x"]:
            with self.assertRaises(proxy.APIError) as caught:
                proxy.resolve_model(name)
            self.assertEqual(caught.exception.status, 404, name)
            self.assertEqual(caught.exception.code, "model_not_found")
            self.assertIn("claude-opus-4", caught.exception.message)

    def test_model_must_be_a_string(self):
        for value in [None, 3, ["opus"], "", "   "]:
            with self.assertRaises(proxy.APIError) as caught:
                proxy.resolve_model(value)
            self.assertEqual((caught.exception.status, caught.exception.param), (400, "model"))


class MessagesTest(unittest.TestCase):
    def test_lone_user_message_is_the_prompt_as_is(self):
        self.assertEqual(messages_to_prompt([{"role": "user", "content": "--help"}]),
                         (None, "--help"))

    def test_system_and_developer_messages_become_appended_instructions(self):
        system, content = messages_to_prompt([
            {"role": "system", "content": "Be terse."},
            {"role": "developer", "content": [{"type": "text", "text": "Speak French."}]},
            {"role": "user", "content": "hi"}])
        self.assertEqual(system, "Be terse.\n\nSpeak French.")
        self.assertEqual(content, "hi")

    def test_conversation_becomes_a_delimited_transcript_then_the_last_message(self):
        system, content = messages_to_prompt([
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "And 3+3?"}])
        self.assertEqual(system, "Be brief.")
        self.assertTrue(content.startswith(proxy.TRANSCRIPT_HEAD))
        self.assertIn('<message role="user">\nWhat is 2+2?\n</message>\n'
                      '<message role="assistant">\n4\n</message>\n</conversation>', content)
        self.assertTrue(content.endswith("</conversation>\n\nAnd 3+3?"))

    def test_images_become_anthropic_blocks(self):
        _, content = messages_to_prompt([{"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG_1PX}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}]}])
        self.assertEqual(content, [
            {"type": "text", "text": "what is this"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": PNG_1PX}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}])

    def test_images_in_earlier_turns_stay_in_place(self):
        _, content = messages_to_prompt([
            {"role": "user", "content": [{"type": "image_url", "image_url": {
                "url": "data:image/gif;base64,R0lGODlhAQABAAAAACw="}}]},
            {"role": "assistant", "content": "A dot."},
            {"role": "user", "content": "Sure?"}])
        self.assertEqual([b["type"] for b in content], ["text", "image", "text"])
        self.assertTrue(content[0]["text"].endswith('<message role="user">\n'))
        self.assertTrue(content[2]["text"].endswith("</conversation>\n\nSure?"))

    def test_bad_messages_are_400_naming_the_field(self):
        cases = [
            (None, "messages"), ([], "messages"), ("hi", "messages"), ([1], "messages[0]"),
            ([{"role": "wizard", "content": "x"}], "messages[0].role"),
            ([{"role": "user", "content": 5}], "messages[0].content"),
            ([{"role": "user", "content": [{"type": "audio"}]}], "messages[0].content[0].type"),
            ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text"),
            ([{"role": "user", "content": ["x"]}], "messages[0].content[0]"),
            ([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
              {"role": "user", "content": "hi"}], "messages[0].content[0].type"),
            ([{"role": "user", "content": [{"type": "image_url", "image_url": {
                "url": "http://example.com/a.png"}}]}], "messages[0].content[0].image_url.url"),
            ([{"role": "user", "content": [{"type": "image_url", "image_url": {
                "url": "data:image/bmp;base64,AAAA"}}]}], "messages[0].content[0].image_url.url"),
            ([{"role": "user", "content": [{"type": "image_url", "image_url": {
                "url": "data:image/png;base64,@@@"}}]}], "messages[0].content[0].image_url.url"),
            ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
             "messages[0].content[0].image_url"),
            ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
             "messages"),
            ([{"role": "system", "content": "only"}], "messages"),
            ([{"role": "tool", "content": "x", "tool_call_id": "1"}], "messages"),
            ([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"id": "1"}]},
              {"role": "user", "content": "x"}], "messages[1].tool_calls[0]"),
            ([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{x"}}]},
              {"role": "tool", "tool_call_id": "1", "content": "r"}],
             "messages[1].tool_calls[0].function.arguments"),
            ([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]},
              {"role": "tool", "tool_call_id": "1", "content": "r"}],
             "messages[1].tool_calls[0].function.arguments"),
            ([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "f",
                                                             "arguments": "[" * 100000}}]},
              {"role": "tool", "tool_call_id": "1", "content": "r"}],
             "messages[1].tool_calls[0].function.arguments"),
            ([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
              {"role": "tool", "content": "r"}], "messages[2].tool_call_id"),
            ([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
              {"role": "tool", "tool_call_id": "2", "content": "r"}], "messages"),
            ([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": "x"},
              {"role": "user", "content": "x"}], "messages[1].tool_calls"),
        ]
        for messages, param in cases:
            with self.assertRaises(proxy.APIError, msg=repr(messages)) as caught:
                messages_to_prompt(messages)
            self.assertEqual((caught.exception.status, caught.exception.param), (400, param),
                             repr(messages))


class RequestTest(unittest.TestCase):
    def parse(self, **fields):
        body = {"model": "sonnet", "messages": [{"role": "user", "content": "hi"}]}
        body.update(fields)
        return proxy.parse_chat_request(body)

    def rejects(self, param, **fields):
        with self.assertRaises(proxy.APIError) as caught:
            self.parse(**fields)
        self.assertEqual(caught.exception.status, 400, fields)
        self.assertEqual(caught.exception.param, param, fields)
        return caught.exception

    def test_defaults(self):
        request = self.parse()
        self.assertEqual((request.stream, request.include_usage, request.max_tokens, request.stop),
                         (False, False, None, ()))

    def test_fields_are_read(self):
        request = self.parse(stream=True, stream_options={"include_usage": True}, max_tokens=50,
                             stop=["END", "\n\n"])
        self.assertEqual((request.stream, request.include_usage, request.max_tokens, request.stop),
                         (True, True, 50, ("END", "\n\n")))
        self.assertEqual(self.parse(max_completion_tokens=7, max_tokens=99).max_tokens, 7)
        self.assertEqual(self.parse(stop="x").stop, ("x",))

    def test_ignored_parameters_are_accepted(self):
        request = self.parse(temperature=0.2, top_p=1, presence_penalty=0, frequency_penalty=0.5, seed=4,
                   user="u", logit_bias={"50256": -100}, n=1, tools=[], tool_choice="none",
                   response_format={"type": "text"}, logprobs=False, metadata={"a": "b"})
        self.assertEqual(request, self.parse())

    def test_wrong_values_are_400_naming_the_field(self):
        self.rejects("stream", stream="yes")
        self.rejects("stream_options", stream_options=[])
        self.rejects("stream_options.include_usage", stream_options={"include_usage": 1})
        for bad in (0, -1, 1.5, "10", True):
            self.rejects("max_tokens", max_tokens=bad)
            self.rejects("max_completion_tokens", max_completion_tokens=bad)
        for bad in (5, ["a", "b", "c", "d", "e"], [1], ""):
            self.rejects("stop", stop=bad)
        for bad in (2, 0, "1", True):
            self.rejects("n", n=bad)
        self.rejects("temperature", temperature="hot")
        self.rejects("top_p", top_p=[1])
        self.rejects("logprobs", logprobs=True)

    def test_tools_are_read(self):
        weather = {"type": "function", "function": {"name": "get_weather", "description": "W",
                                                    "parameters": {"properties": {}}}}
        time_ = {"type": "function", "function": {"name": "get_time"}}
        request = self.parse(tools=[weather, time_], parallel_tool_calls=False)
        self.assertEqual([(t.name, t.description, t.schema) for t in request.tools], [
            ("get_time", "", {"type": "object", "properties": {}}),
            ("get_weather", "W", {"type": "object", "properties": {}})], "sorted: cacheable")
        self.assertEqual((request.tool_choice, request.parallel_tools), ("auto", False))
        self.assertEqual(self.parse(tools=[weather], tool_choice="required").tool_choice,
                         "required")
        named = self.parse(tools=[weather], tool_choice={"type": "function", "function": {
            "name": "get_weather"}})
        self.assertEqual(named.tool_choice, "get_weather")
        self.assertEqual(self.parse(tools=[weather], tool_choice="none").tools, (),
                         "none offers nothing")
        allowed = self.parse(tools=[weather, time_], tool_choice={
            "type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
                {"type": "function", "function": {"name": "get_time"}}]}})
        self.assertEqual(([t.name for t in allowed.tools], allowed.tool_choice),
                         (["get_time"], "required"))
        legacy = self.parse(functions=[weather["function"]], function_call={"name": "get_weather"})
        self.assertEqual((legacy.tools[0].name, legacy.tool_choice, legacy.parallel_tools,
                          legacy.echo), ("get_weather", "get_weather", False, {"functions": True}))
        self.assertEqual(self.parse(response_format={"type": "json_object"}).output_schema,
                         {"type": "object"})
        schema = {"type": "object", "properties": {"a": {"type": "string"}}}
        self.assertEqual(self.parse(response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": schema, "strict": True}}).output_schema, schema)

    def test_tool_results_keep_their_images_in_the_transcript(self):
        image = "data:image/png;base64," + PNG_1PX
        request = self.parse(tools=[{"type": "function", "function": {"name": "shot"}}],
                             messages=[
            {"role": "user", "content": "screenshot?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type":
                                                                   "function", "function": {
                                                                       "name": "shot",
                                                                       "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": [
                {"type": "text", "text": "here"}, {"type": "image_url",
                                                   "image_url": {"url": image}}]}])
        content = proxy.Launch("/bin/claude", request).stdin()
        line = json.loads(content)["message"]["content"]
        kinds = [b["type"] for b in line]
        self.assertEqual(kinds.count("image"), 1)
        before = "".join(b.get("text", "") for b in line[:kinds.index("image")])
        self.assertTrue(before.rstrip().endswith('<tool_result tool_call_id="c1">\nhere'), before)
        self.assertIn('name="mcp__proxy__shot"', before, "the call under the offered name")
        self.assertTrue(line[-1]["text"].endswith(proxy.TOOL_RESULTS_TAIL))

    def test_tool_history_becomes_tool_blocks(self):
        request = self.parse(messages=[
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "w", "arguments":
                                                              '{"city": "Paris"}'}},
                {"id": "c2", "type": "function", "function": {"name": "w", "arguments": ""}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "rain"}]},
            {"role": "user", "content": "thanks"}])
        self.assertEqual(request.turns, [
            ("user", [{"type": "text", "text": "weather?"}]),
            ("assistant", [{"type": "tool_use", "id": "c1", "name": "w", "input": {
                "city": "Paris"}}, {"type": "tool_use", "id": "c2", "name": "w", "input": {}}]),
            ("user", [{"type": "tool_result", "tool_use_id": "c1", "content": [
                {"type": "text", "text": "sunny"}]}, {"type": "tool_result", "tool_use_id": "c2",
                                                      "content": [{"type": "text",
                                                                   "text": "rain"}]},
                {"type": "text", "text": "thanks"}])])
        legacy = self.parse(messages=[
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "function_call": {"name": "w", "arguments": "{}"}},
            {"role": "function", "name": "w", "content": "sunny"}])
        self.assertEqual(legacy.turns[1][1][0]["id"], legacy.turns[2][1][0]["tool_use_id"])

    def test_bad_tools_are_a_400_naming_the_field(self):
        fn = {"type": "function", "function": {"name": "f"}}
        self.rejects("tools", tools="f")
        self.rejects("tools[0].type", tools=[{"type": "custom", "custom": {"name": "f"}}])
        self.rejects("tools[0]", tools=[{"type": "function"}])
        for name in ("a b", "x" * 65, "", None, "caf\u00e9"):
            self.rejects("tools[0].function.name", tools=[{"type": "function", "function": {
                "name": name}}])
        self.rejects("tools[0].function.description", tools=[{"type": "function", "function": {
            "name": "f", "description": 5}}])
        for bad in ({"type": "array"}, [], "x"):
            self.rejects("tools[0].function.parameters", tools=[{"type": "function", "function": {
                "name": "f", "parameters": bad}}])
        self.rejects("tools", tools=[fn, fn])
        self.rejects("tools", tools=[fn] * (proxy.MAX_TOOLS + 1))
        self.rejects("functions", tools=[fn], functions=[{"name": "g"}])
        self.rejects("tool_choice", tools=[fn], tool_choice={"type": "function", "function": {
            "name": "g"}})
        for bad in (5, "always", {"type": "function"}):
            self.rejects("tool_choice", tools=[fn], tool_choice=bad)
        self.rejects("function_call", functions=[{"name": "f"}], function_call={"name": "g"})
        self.rejects("parallel_tool_calls", tools=[fn], parallel_tool_calls="yes")
        self.rejects("response_format.type", response_format="json")
        self.rejects("response_format.type", response_format={"type": "xml"})
        self.rejects("response_format", response_format={"type": "json_schema"})
        self.rejects("response_format", response_format={"type": "json_schema", "json_schema": {
            "schema": {"type": "array"}}})
        self.rejects("response_format", response_format={"type": "json_schema", "json_schema": {
            "schema": {"type": "object", "description": "x" * proxy.MAX_SCHEMA_BYTES}}})

    def test_body_must_be_an_object(self):
        for body in ([], "x", 1, None):
            with self.assertRaises(proxy.APIError) as caught:
                proxy.parse_chat_request(body)
            self.assertEqual((caught.exception.status, caught.exception.code),
                             (400, "invalid_value"), body)

    def test_json_body_parsing(self):
        self.assertEqual(proxy.parse_json_body(b'{"a": 1}'), {"a": 1})
        for raw in (b"{", b"\xff\xfe\x00", b"[" * 100000, b'{"a": NaN}', b'{"a": Infinity}',
                    b"", b"1" * 5000):
            with self.assertRaises(proxy.APIError, msg=raw[:20]) as caught:
                proxy.parse_json_body(raw)
            self.assertEqual(caught.exception.status, 400)


class CommandTest(unittest.TestCase):
    def test_cli_gets_no_tools_no_mcp_no_commands_no_session_and_no_prompt(self):
        argv = launch_for("SECRET PROMPT").argv({})
        self.assertEqual(argv[:2], ["/bin/claude", "-p"])
        for flags in (["--input-format", "stream-json"], ["--output-format", "stream-json"],
                      ["--model", "opus"], ["--tools", ""], ["--permission-mode", "dontAsk"]):
            i = argv.index(flags[0])
            self.assertEqual(argv[i:i + 2], flags)
        for flag in ("--verbose", "--include-partial-messages", "--strict-mcp-config",
                     "--disable-slash-commands", "--no-session-persistence"):
            self.assertIn(flag, argv)
        self.assertNotIn("--mcp-config", argv)
        self.assertNotIn("--dangerously-skip-permissions", argv)
        self.assertNotIn("--effort", argv, "the CLI's default unless asked for")
        self.assertFalse(any("SECRET" in a for a in argv))
        self.assertEqual(launch_for("hi").argv({"system": "/x/sys"})[-2:],
                         ["--append-system-prompt-file", "/x/sys"])

    def test_none_of_the_users_claude_setup_is_read(self):
        argv = launch_for("hi").argv({})
        self.assertIn("--safe-mode", argv)
        i = argv.index("--setting-sources")
        self.assertEqual(argv[i + 1], "", "no setting source: user, project and local are out")
        self.assertEqual(argv.count("--setting-sources"), 1)
        # Opted in (--user-settings): the user's own scope, still never project or local ones.
        argv = launch_for("hi", user_settings=True).argv({})
        self.assertNotIn("--safe-mode", argv)
        self.assertEqual(argv[argv.index("--setting-sources") + 1], "user")
        for flag in ("--strict-mcp-config", "--disable-slash-commands", "--no-session-persistence"):
            self.assertIn(flag, argv)

    def test_tools_come_only_through_the_bridge(self):
        tools = [{"type": "function", "function": {"name": "Bash", "description": "Mine",
                                                   "parameters": {"type": "object"}}},
                 {"type": "function", "function": {"name": "x" * 64}},
                 {"type": "function", "function": {"name": "x" * 63 + "y"}}]
        launch = launch_for("hi", tools=tools, tool_choice="required")
        files = launch.files()
        argv = launch.argv({"tools": "/x/tools", "system": "/x/sys"})
        self.assertEqual(argv[argv.index("--tools") + 1], "", "none of the CLI's own tools")
        self.assertEqual(argv[argv.index("--permission-mode") + 1], "dontAsk")
        self.assertEqual(argv[argv.index("--max-turns") + 1], "1", "no turn after the calls")
        self.assertIn("--strict-mcp-config", argv)
        self.assertNotIn("--safe-mode", argv, "it would turn the bridge off")
        self.assertEqual(argv[argv.index("--setting-sources") + 1], "")
        config = json.loads(argv[argv.index("--mcp-config") + 1])
        self.assertEqual(list(config["mcpServers"]), ["proxy"], "the bridge and nothing else")
        server = config["mcpServers"]["proxy"]
        listed = json.loads(files["tools"])
        self.assertEqual(server["args"][:3], ["-I", "-S", "-c"])
        self.assertEqual(server["args"][4:], [os.path.abspath(proxy.__file__), "mcp-bridge",
                                              "/x/tools", proxy.__version__])
        # What the CLI runs starts the bridge (bridge_main alone): it answers as the MCP server.
        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            f.write(files["tools"])
            f.flush()
            done = subprocess.run(
                [server["command"]] + server["args"][:-2] + [f.name, proxy.__version__],
                capture_output=True, timeout=30, input=(
                    b'{"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {}}\n'
                    b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}\n'))
        initialized, tools_list = [json.loads(line) for line in done.stdout.splitlines()]
        self.assertEqual(initialized["result"]["serverInfo"], {
            "name": "claude-max-proxy", "version": proxy.__version__})
        self.assertEqual(tools_list["result"]["tools"], listed)
        names = [t["name"] for t in listed]
        self.assertEqual(names[0], "Bash")
        self.assertEqual(listed[0]["inputSchema"], {"type": "object"})
        self.assertTrue(all(len("mcp__proxy__" + n) <= 64 for n in names), names)
        self.assertEqual(len(set(names)), 3, "long names get distinct aliases")
        self.assertIn("must call at least one", files["system"])
        self.assertEqual(launch.environment({})["ENABLE_TOOL_SEARCH"], "false")
        self.assertNotIn("ENABLE_TOOL_SEARCH", launch_for("hi").environment({}))
        self.assertNotIn("tools", launch_for("hi").files())

    def test_a_schema_goes_to_the_cli(self):
        schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
        argv = launch_for("hi", response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": schema}}).argv({})
        self.assertEqual(json.loads(argv[argv.index("--json-schema") + 1]), schema)
        self.assertNotIn("--max-turns", argv, "the CLI may remind the model once")
        self.assertNotIn("--json-schema", launch_for("hi").argv({}))

    def test_effort_is_passed_on(self):
        argv = launch_for("hi", reasoning_effort="high").argv({})
        self.assertEqual(argv[argv.index("--effort") + 1], "high")

    def test_user_settings_are_off_unless_asked_for(self):
        self.assertFalse(settings().user_settings)
        self.assertTrue(proxy.parse_args(["--user-settings"]).user_settings)
        for value, expected in (("1", True), ("true", True), ("0", False), ("", False)):
            with mock.patch.dict(os.environ, {"CLAUDE_MAX_API_USER_SETTINGS": value}):
                self.assertIs(proxy.parse_args([]).user_settings, expected, value)

    def test_stdin_is_one_stream_json_user_message(self):
        line = launch_for("h\u00e9\nllo").stdin()
        self.assertTrue(line.endswith(b"\n"))
        self.assertEqual(line.count(b"\n"), 1)
        self.assertEqual(json.loads(line), {"type": "user", "message": {
            "role": "user", "content": "h\u00e9\nllo"}})

    def test_environment(self):
        env = launch_for("hi", max_tokens=77).environment({"PATH": "/bin", "CLAUDECODE": "1"})
        self.assertEqual(env, {"PATH": "/bin", "CLAUDE_CODE_MAX_OUTPUT_TOKENS": "77",
                               "CLAUDE_CODE_DISABLE_AUTO_MEMORY": "1"})
        self.assertEqual(launch_for("hi").environment({"CLAUDE_CODE_DISABLE_AUTO_MEMORY": "0"})[
            "CLAUDE_CODE_DISABLE_AUTO_MEMORY"], "1")
        self.assertNotIn("CLAUDE_CODE_MAX_OUTPUT_TOKENS", launch_for("hi").environment({}))


class StopSequencesTest(unittest.TestCase):
    def run_stops(self, stops, pieces):
        s = proxy.StopSequences(stops)
        out = []
        for piece in pieces:
            out.append(s.feed(piece))
            if s.hit:
                return "".join(out), True
        return "".join(out) + s.flush(), False

    def test_cut_at_first_match_even_across_pieces(self):
        self.assertEqual(self.run_stops(["END"], ["Hello E", "N", "D more"]), ("Hello ", True))
        self.assertEqual(self.run_stops(["b", "a"], ["xxab"]), ("xx", True))
        self.assertEqual(self.run_stops(["\n\n"], ["one\n", "\ntwo"]), ("one", True))

    def test_no_match_gives_everything_back(self):
        self.assertEqual(self.run_stops(["END"], ["Hello E", "N", "d"]), ("Hello ENd", False))
        self.assertEqual(self.run_stops([], ["a", "b"]), ("ab", False))

    def test_only_a_possible_prefix_is_held_back(self):
        s = proxy.StopSequences(["STOP"])
        self.assertEqual(s.feed("abc S"), "abc ")
        self.assertEqual(s.feed("T"), "")
        self.assertEqual(s.feed("x"), "STx")


def tool_fold(text, opts=None, **options):
    """The completion events of the fake's lines for `text`, with get_weather and get_time
    offered through the bridge (and the lines the fake prints when they are)."""
    tools = {"mcp__proxy__" + t.name: t for t in (
        proxy.Tool("get_weather", "", {"type": "object"}), proxy.Tool("get_time", "", {
            "type": "object"}, namespace=None))}
    fake.MCP_TOOLS[:] = [{"server": "proxy", "name": name} for name in tools]
    try:
        lines = []
        for line in fake.scenario(text, "claude-opus-5-5", opts):
            if isinstance(line, tuple):
                _, model_, blocks, stop_reason, u = line
                lines.extend(fake.message_events(model_, blocks, stop_reason, u))
            elif isinstance(line, dict):
                lines.append(line)
    finally:
        fake.MCP_TOOLS[:] = []
    return lines, list(proxy.completion_events(lines, tools=tools, **options))


def text(value):
    return [{"type": "text", "text": value}]


class WarmKeyTest(unittest.TestCase):
    """What a warm CLI is bound to (warm_key) and what is set on its stdin (stdin_controls)."""

    def launch(self, content="hi", resumed=None, learn=False, **fields):
        launch = launch_for(content, "/bin/claude", **fields)
        if resumed is not None or learn:
            history = proxy.conversation_history(launch.request.turns, {}, False)
            launch = launch._replace(session=proxy.SessionPlan(
                None if learn else history, [{"type": "attachment"}], "k", "2.1.331",
                learn=learn))
        return launch

    def test_the_prompt_model_and_system_prompt_are_not_bound_at_spawn(self):
        base = proxy.warm_key(self.launch())
        self.assertIsNotNone(base)
        system = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "x"}]
        for fields in ({"content": "another prompt"}, {"model": "sonnet"}, {"model": "haiku"},
                       {"messages": system}):
            self.assertEqual(proxy.warm_key(self.launch(**fields)), base, fields)
        self.assertNotEqual(proxy.warm_key(self.launch(model="sonnet"), strict=True),
                            proxy.warm_key(self.launch(), strict=True))
        self.assertNotEqual(proxy.warm_key(self.launch(messages=system), strict=True),
                            proxy.warm_key(self.launch(), strict=True))

    def test_what_is_fixed_at_spawn_is_a_shape_of_its_own(self):
        keys = {proxy.warm_key(self.launch(**fields)) for fields in (
            {}, {"tools": [{"type": "function", "function": {"name": "f"}}]},
            {"tools": [{"type": "function", "function": {"name": "g"}}]}, {"max_tokens": 50},
            {"max_tokens": 51}, {"reasoning_effort": "low"},
            {"response_format": {"type": "json_object"}})}
        keys.add(proxy.warm_key(self.launch()._replace(user_settings=True)))
        keys.add(proxy.warm_key(self.launch()._replace(claude="/other/claude")))
        self.assertEqual(len(keys), 9)

    def test_a_conversation_is_bound_to_its_rows_and_a_learning_run_never_waits(self):
        def turn(*texts):
            roles = ["user", "assistant"] * len(texts)
            return self.launch(messages=[{"role": r, "content": t}
                                         for r, t in zip(roles, texts)], resumed=True)
        first = proxy.warm_key(turn("a", "b", "c"))
        self.assertEqual(proxy.warm_key(turn("a", "b", "another last message")), first,
                         "the last user turn goes on stdin")
        self.assertNotEqual(proxy.warm_key(turn("a", "B", "c")), first)
        self.assertNotEqual(proxy.warm_key(turn("a", "b", "c")._replace(request=turn(
            "a", "b", "c").request._replace(cli_model="sonnet"))), first,
            "a session holds its model")
        self.assertIsNone(proxy.warm_key(self.launch(learn=True)))
        days = []
        for day in ("2026-12-01", "2026-12-02"):  # the environment note holds the date
            with mock.patch.object(time, "strftime", return_value=day):
                days.append(proxy.warm_key(self.launch()))
        self.assertNotEqual(days[0], days[1])

    def test_the_flags(self):
        with mock.patch.dict(os.environ, {"CLAUDE_MAX_API_WARM": "",
                                          "CLAUDE_MAX_API_WARM_IDLE": ""}):
            args = proxy.parse_args([])
            self.assertEqual((args.warm, args.warm_idle), (2, 300.0))
            self.assertEqual(proxy.parse_args(["--warm", "0"]).warm, 0)
        with mock.patch.dict(os.environ, {"CLAUDE_MAX_API_WARM": "3",
                                          "CLAUDE_MAX_API_WARM_IDLE": "60"}):
            args = proxy.parse_args([])
            self.assertEqual((args.warm, args.warm_idle), (3, 60.0))

    def test_stdin_controls_set_what_differs(self):
        system = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "x"}]
        plain, terse = self.launch(), self.launch(messages=system)
        self.assertEqual(proxy.stdin_controls(plain, plain), [])
        self.assertEqual(proxy.stdin_controls(terse, plain), [
            {"subtype": "initialize", "appendSystemPrompt": "Be terse."}])
        self.assertEqual(proxy.stdin_controls(plain, terse), [
            {"subtype": "initialize", "appendSystemPrompt": ""}])
        self.assertEqual(proxy.stdin_controls(self.launch(model="haiku"), plain), [
            {"subtype": "set_model", "model": "haiku"}])


class SlotReclaimTest(unittest.TestCase):
    """ProcessSlots with warm processes: they take only a free slot nobody waits for, and a
    request takes the slot of an idle one instead of waiting."""

    def test_a_warm_process_takes_only_a_free_slot_nobody_waits_for(self):
        slots = proxy.ProcessSlots(1, 4)
        self.assertTrue(slots.try_acquire())
        self.assertFalse(slots.try_acquire())
        slots.release()
        slots.acquire(1.0)
        waiter = threading.Thread(target=lambda: (slots.acquire(5.0), slots.release()))
        waiter.start()
        wait_until(lambda: slots.queued == 1, what="a request to wait")
        slots.release()
        waiter.join()
        self.assertTrue(slots.try_acquire())
        slots.close()
        slots.release()
        self.assertFalse(slots.try_acquire(), "none once closed")

    def test_a_request_gets_an_idle_warm_process_slot_at_once(self):
        slots = proxy.ProcessSlots(1, 4)
        self.assertTrue(slots.try_acquire())  # the warm process's
        idle = [True]

        def reclaim():
            had, idle[0] = idle[0], False
            return had

        released = []
        slots.attach(reclaim, lambda: released.append(1))
        self.assertEqual(slots.acquire(0.5), 0.0)
        self.assertEqual(slots.running, 1, "its slot passed on, not a second one")
        with self.assertRaises(proxy.APIError) as caught:
            slots.acquire(0.3)  # nothing left to reclaim: a 429 after the wait
        self.assertEqual(caught.exception.status, 429)
        slots.release()
        self.assertEqual((slots.running, released), (0, [1]))


# Two lines seen from 2.1.331 on a claude.ai login: a warning at 91% of the 5-hour window, and
# an answer that succeeded once that window was used up, billed as extra usage.
WARNING_EVENT = {"status": "allowed_warning", "resetsAt": 1796520621, "rateLimitType": "five_hour",
                 "utilization": 0.91, "isUsingOverage": False, "surpassedThreshold": 0.9,
                 "unifiedWindows": {"five_hour": {"utilization": 0.91, "resetsAt": 1796520621,
                                                  "status": "allowed_warning",
                                                  "surpassedThreshold": 0.9},
                                    "seven_day": {"utilization": 0.4, "resetsAt": 1796603421,
                                                  "status": "allowed"}}}
OVERAGE_EVENT = {"status": "rejected", "rateLimitType": "five_hour", "overageStatus": "allowed",
                 "isUsingOverage": True, "unifiedWindows": {
                     "five_hour": {"utilization": 1, "resetsAt": 1796520617},
                     "seven_day": {"utilization": 0.5, "resetsAt": 1796603417}}}
WARNED_AT = 1796517021  # when the warning came: 3,600 s before the 5-hour window resets


class SubscriptionTest(unittest.TestCase):
    """What the CLI's rate_limit_event lines make of the subscription's state (pure: no
    process, no socket; the time is given)."""

    def subscription(self, reserve=0, allow=False, path=None):
        return proxy.Subscription(path, reserve, allow)

    def test_before_any_event_nothing_is_known(self):
        usage = self.subscription().status(WARNED_AT)
        self.assertEqual((usage["windows"], usage["status"], usage["updated_at"]), ({}, None, None))
        self.assertEqual(usage["overage"], {"status": None, "in_use": False})
        self.assertEqual(self.subscription().headers(WARNED_AT), [])
        self.assertIsNone(self.subscription(reserve=50).refusal(WARNED_AT))

    def test_the_state_of_each_window_as_reported(self):
        sub = self.subscription()
        sub.learn(WARNING_EVENT, WARNED_AT)
        usage = sub.status(WARNED_AT)
        self.assertEqual(usage["updated_at"], WARNED_AT)
        self.assertEqual(usage["status"], "allowed_warning")
        self.assertEqual(usage["windows"], {
            "five_hour": {"utilization": 0.91, "resets_at": 1796520621, "status": "allowed_warning",
                          "surpassed_threshold": 0.9},
            "seven_day": {"utilization": 0.4, "resets_at": 1796603421, "status": "allowed"}})
        self.assertEqual(usage["overage"], {"status": None, "in_use": False})
        # A later event naming other windows, one unknown so far, with fields missing or wrong:
        # each window it names is replaced; the others stay.
        sub.learn({"status": "allowed", "overageStatus": "rejected", "unifiedWindows": {
            "seven_day_opus": {"utilization": 0.2, "resetsAt": 1796603421},
            "seven_day": {"utilization": "0.5", "resetsAt": None, "status": 3},
            "odd": "not a window", 7: {"utilization": 1}}}, WARNED_AT + 10)
        usage = sub.status(WARNED_AT + 10)
        self.assertEqual(set(usage["windows"]), {"five_hour", "seven_day", "seven_day_opus"})
        self.assertEqual(usage["windows"]["seven_day"]["utilization"], 0.4, "kept: the new one "
                         "said nothing that reads as a window")
        self.assertEqual(usage["windows"]["seven_day_opus"], {"utilization": 0.2,
                                                              "resets_at": 1796603421})
        self.assertEqual((usage["status"], usage["overage"]["status"]), ("allowed", "rejected"))
        for junk in (None, [], "x", {"unifiedWindows": []}, {"status": 5}):
            sub.learn(junk, WARNED_AT + 20)  # never an exception
        self.assertIn("five_hour", sub.status(WARNED_AT + 20)["windows"])

    def test_a_window_past_its_reset_is_reset(self):
        sub = self.subscription(reserve=20)
        with self.assertLogs("claude_max_proxy", "WARNING"):
            sub.learn(OVERAGE_EVENT, WARNED_AT)
        later = 1796520617 + 1  # the 5-hour window has reset, the weekly has not
        usage = sub.status(later)
        self.assertEqual(usage["windows"]["five_hour"], {"utilization": 0.0, "resets_at": None,
                                                         "status": "allowed", "reset": True})
        self.assertEqual(usage["windows"]["seven_day"]["utilization"], 0.5)
        self.assertEqual(usage["status"], "allowed", "the window that was rejected began anew")
        self.assertEqual(usage["overage"]["in_use"], False)
        self.assertIsNone(sub.refusal(later))

    def test_the_headers_the_api_sends_a_subscription_login(self):
        sub = self.subscription()
        sub.learn(dict(WARNING_EVENT, overageStatus="allowed"), WARNED_AT)
        self.assertEqual(dict(sub.headers(WARNED_AT)), {
            "anthropic-ratelimit-unified-status": "allowed_warning",
            "anthropic-ratelimit-unified-5h-utilization": "0.91",
            "anthropic-ratelimit-unified-5h-reset": "1796520621",
            "anthropic-ratelimit-unified-5h-status": "allowed_warning",
            "anthropic-ratelimit-unified-7d-utilization": "0.4",
            "anthropic-ratelimit-unified-7d-reset": "1796603421",
            "anthropic-ratelimit-unified-7d-status": "allowed",
            "anthropic-ratelimit-unified-overage-status": "allowed",
            "anthropic-ratelimit-unified-overage-in-use": "false"})

    def test_the_reserve_refuses_at_once_until_the_window_resets(self):
        sub = self.subscription(reserve=10)  # a window at 90% or more is the user's
        sub.learn(WARNING_EVENT, WARNED_AT)
        error = sub.refusal(WARNED_AT)
        self.assertEqual((error.status, error.code, error.type),
                         (429, "usage_reserve", "rate_limit_error"))
        self.assertEqual(error.headers["Retry-After"], "3600")
        self.assertIn("5-hour", error.message)
        self.assertIn("91%", error.message)
        self.assertIn(time.strftime("%H:%M", time.localtime(1796520621)), error.message)
        self.assertIn("(in 1h 00m)", error.message)
        under = self.subscription(reserve=8)  # 91% < 92%: served
        under.learn(WARNING_EVENT, WARNED_AT)
        self.assertIsNone(under.refusal(WARNED_AT))
        self.assertIsNone(sub.refusal(1796520621), "reset: served again")
        weekly = self.subscription(reserve=60)  # the weekly window at 40%: its share too
        weekly.learn(WARNING_EVENT, WARNED_AT)
        self.assertIn("5-hour", weekly.refusal(WARNED_AT).message)
        self.assertIn("weekly", weekly.refusal(1796520621).message)
        self.assertEqual(weekly.refusal(1796520621).retry_after, 1796603421 - 1796520621)

    def test_extra_usage_is_refused_unless_allowed(self):
        sub = self.subscription()
        sub.learn(WARNING_EVENT, WARNED_AT)
        self.assertIsNone(sub.refusal(WARNED_AT))
        with self.assertLogs("claude_max_proxy", "WARNING") as logs:
            sub.learn(OVERAGE_EVENT, WARNED_AT + 1)
            sub.learn(OVERAGE_EVENT, WARNED_AT + 2)
        self.assertEqual(len(logs.output), 1, "warned once")
        self.assertIn("extra usage", logs.output[0])
        self.assertEqual(sub.status(WARNED_AT + 2)["overage"], {"status": "allowed",
                                                                "in_use": True})
        error = sub.refusal(WARNED_AT + 2)
        self.assertEqual((error.status, error.code, error.retry_after),
                         (429, "extra_usage", 1796520617 - WARNED_AT - 2))
        self.assertIn("billed as extra usage", error.message)
        self.assertIn("--allow-extra-usage", error.message)
        self.assertIsNone(sub.refusal(1796520617), "the 5-hour window reset")
        allowed = self.subscription(allow=True)
        with self.assertLogs("claude_max_proxy", "WARNING"):
            allowed.learn(OVERAGE_EVENT, WARNED_AT)
        self.assertIsNone(allowed.refusal(WARNED_AT))
        self.assertEqual(allowed.status(WARNED_AT)["allow_extra_usage"], True)

    def test_the_state_survives_a_restart_in_a_private_file(self):
        folder = tempfile.mkdtemp(prefix="proxy-usage-")
        self.addCleanup(shutil.rmtree, folder, True)
        path = os.path.join(folder, "subscription.json")
        first = self.subscription(path=path)
        first.learn(WARNING_EVENT, WARNED_AT)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        again = self.subscription(path=path)
        self.assertEqual({k: v for k, v in again.status(WARNED_AT).items() if k != "totals"},
                         {k: v for k, v in first.status(WARNED_AT).items() if k != "totals"})
        self.assertEqual(again.status(WARNED_AT)["updated_at"], WARNED_AT)
        for damaged in ("{not json", "[]", '{"windows": 5}', ""):
            with open(path, "w") as f:
                f.write(damaged)
            with self.assertLogs("claude_max_proxy", "WARNING") if damaged in ("", "{not json") \
                    else contextlib.nullcontext():
                self.assertEqual(self.subscription(path=path).status(WARNED_AT)["windows"], {})

    def test_totals_count_answered_requests_and_their_api_value(self):
        sub = self.subscription()
        sub.spent({"input_tokens": 12, "output_tokens": 9, "cache_creation_input_tokens": 3,
                   "cache_read_input_tokens": 5})
        sub.spent({"input_tokens": 24, "output_tokens": 33, "junk": 7, "cache_read_input_tokens":
                   True})
        sub.cost({"total_cost_usd": 0.000228})
        sub.cost({"total_cost_usd": 0.000288})
        sub.cost({"total_cost_usd": "free"})
        totals = sub.status(WARNED_AT)["totals"]
        self.assertEqual({k: v for k, v in totals.items() if k != "since"}, {
            "requests": 2, "input_tokens": 36, "output_tokens": 42,
            "cache_creation_input_tokens": 3, "cache_read_input_tokens": 5,
            "api_equivalent_usd": 0.000516})

    def test_the_flags_and_their_environment_variables(self):
        clean = {k: "" for k in os.environ if k.startswith("CLAUDE_MAX_API")}
        with mock.patch.dict(os.environ, clean):
            args = proxy.parse_args([])
            self.assertEqual((args.reserve, args.allow_extra_usage), (0, False))
            args = proxy.parse_args(["--reserve", "20", "--allow-extra-usage"])
            self.assertEqual((args.reserve, args.allow_extra_usage), (20, True))
            with mock.patch.dict(os.environ, {"CLAUDE_MAX_API_RESERVE": "15",
                                              "CLAUDE_MAX_API_ALLOW_EXTRA_USAGE": "1"}):
                args = proxy.parse_args([])
                self.assertEqual((args.reserve, args.allow_extra_usage), (15, True))
            for bad in (["--reserve", "100"], ["--reserve", "-1"], ["--reserve", "ten"]):
                with self.assertRaises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
                    proxy.parse_args(bad)
            with mock.patch.dict(os.environ, {"CLAUDE_MAX_API_RESERVE": "150"}), \
                    self.assertRaises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
                proxy.parse_args([])
        with contextlib.redirect_stdout(io.StringIO()) as out, self.assertRaises(SystemExit):
            proxy.parse_args(["--help"])
        for words in ("--reserve PERCENT", "CLAUDE_MAX_API_RESERVE", "--allow-extra-usage",
                      "CLAUDE_MAX_API_ALLOW_EXTRA_USAGE"):
            self.assertIn(words, out.getvalue())

    def test_the_api_s_subscription_refusals_are_clear_errors(self):
        for text in ("API Error: 400 Third-party apps now draw from your extra usage, not your "
                     "plan limits. Enable extra usage in your account settings.",
                     "API Error: 400 Extra usage is required for long context requests.",
                     "API Error: 400 This request requires extra usage to be enabled."):
            error = proxy.error_from_result({"is_error": True, "subtype": "success",
                                             "api_error_status": 400, "result": text})
            self.assertEqual((error.status, error.code, error.type),
                             (400, "extra_usage_required", "invalid_request_error"), text)
            self.assertNotIn("API Error: 400", error.message)
            self.assertIn(text[len("API Error: 400 "):], error.message)
            self.assertIn("extra usage in your claude.ai settings", error.message)
            self.assertEqual(proxy.anthropic_error(error)[1]["error"]["type"],
                             "invalid_request_error")
        other = proxy.error_from_result({"is_error": True, "api_error_status": 400,
                                         "result": "API Error: 400 something else"})
        self.assertNotEqual(other.code, "extra_usage_required")


class StatusViewTest(unittest.TestCase):
    """What `status` prints and the page shows, from /v1/usage and /health (pure)."""

    NOW = WARNED_AT
    USAGE = {"updated_at": WARNED_AT, "status": "allowed_warning",
             "windows": {"five_hour": {"utilization": 0.91, "resets_at": WARNED_AT + 6720,
                                       "status": "allowed_warning", "surpassed_threshold": 0.9},
                         "seven_day": {"utilization": 0.4, "resets_at": WARNED_AT + 3 * 86400,
                                       "status": "allowed"}},
             "overage": {"status": "allowed", "in_use": False},
             "totals": {"since": WARNED_AT - 11520, "requests": 412, "input_tokens": 100000,
                        "output_tokens": 310000, "cache_creation_input_tokens": 44000,
                        "cache_read_input_tokens": 1056000, "api_equivalent_usd": 41.2},
             "reserve_percent": 0, "allow_extra_usage": False}
    HEALTH = {"status": "ok", "uptime_seconds": 11520,
              "claude": {"logged_in": True, "auth_method": "oauth_token"}}

    def text(self, usage=None, health=None, color=False):
        return proxy.status_text(usage or self.USAGE, health or self.HEALTH, "127.0.0.1:3456",
                                 self.NOW, color)

    def test_one_screen_in_a_terminal_and_as_plain_text(self):
        plain = self.text()
        lines = plain.splitlines()
        self.assertEqual(lines[0], "claude-max-proxy on 127.0.0.1:3456 · logged in "
                                   "(oauth_token) · up 3h 12m")
        five = time.strftime("%H:%M", time.localtime(self.NOW + 6720))
        self.assertEqual(lines[1], "5-hour  [##################--]  91%%  resets %s (in 1h 52m)"
                                   "  warning" % five)
        self.assertTrue(lines[2].startswith("weekly  [########------------]  40%  resets "))
        self.assertIn("(in 3d 0h)", lines[2])
        self.assertEqual(lines[3], "extra usage  allowed on the account; refused by this proxy "
                                   "(--allow-extra-usage)")
        self.assertEqual(lines[4], "since start  412 requests · 1.2M in / 310k out tokens · 88% "
                                   "read from cache · API value $41.20")
        self.assertNotIn("\x1b[", plain)
        self.assertNotIn("█", plain)
        colored = self.text(color=True)
        self.assertIn("\x1b[31m" + "█" * 18, colored, "91%: red")
        self.assertIn("\x1b[32m" + "█" * 8, colored, "40%: green")
        for text in (plain, colored):
            for line in re.sub(r"\x1b\[\d+m", "", text).splitlines()[1:3]:
                self.assertLessEqual(len(line), 80, line)

    def test_unknown_state_is_said_in_words_not_zeros(self):
        empty = {"windows": {}, "overage": {}, "totals": {}, "updated_at": None}
        for claude, words in (
                ({"logged_in": True, "auth_method": "api_key"}, "not reported: Claude Code "
                 "uses an API key"),
                ({"logged_in": True, "auth_method": "oauth_token"}, "not known yet: no answer"),
                ({"logged_in": False, "auth_method": "none"}, "not known: Claude Code is not "
                 "logged in")):
            text = self.text(empty, dict(self.HEALTH, claude=claude))
            self.assertIn("usage  " + words, text)
            self.assertNotIn("0%", text)
            self.assertIn("since start  no requests yet", text)
            self.assertIn("extra usage  not known for the account", text)
        self.assertIn("NOT logged in: run `claude auth login`", self.text(
            empty, dict(self.HEALTH, claude={"logged_in": False})))
        self.assertIn("login not checked yet", self.text(empty, dict(self.HEALTH, claude={})))
        reset = dict(self.USAGE, windows={"five_hour": {"utilization": 0.0, "resets_at": None,
                                                        "status": "allowed", "reset": True}})
        self.assertIn("reset since: a new window", self.text(reset))

    def test_extra_usage_and_the_reserve_in_words(self):
        usage = dict(self.USAGE, reserve_percent=20,
                     overage={"status": "allowed", "in_use": True})
        text = self.text(usage)
        self.assertIn("extra usage  IN USE: the plan's limit is used up; requests are refused",
                      text)
        self.assertIn("reserve  20% of each window kept for you (--reserve)", text)
        self.assertIn("requests go on, billed as extra usage", self.text(
            dict(usage, allow_extra_usage=True)))

    def test_figures_as_a_person_reads_them(self):
        self.assertEqual([proxy.whole_percent(f) for f in (0, 0.29, 0.91, 0.999, 1, 1.5)],
                         ["0%", "29%", "91%", "99%", "100%", "150%"])
        self.assertEqual([proxy.token_count(n) for n in (0, 412, 9500, 310000, 1234567)],
                         ["0", "412", "9.5k", "310k", "1.2M"])
        self.assertEqual([proxy.duration_words(s) for s in (1, 59, 60, 3600, 6720, 3 * 86400)],
                         ["1m", "1m", "1m", "1h 00m", "1h 52m", "3d 0h"])
        now = time.mktime((2026, 12, 7, 12, 0, 0, 0, 0, -1))  # a Monday, noon, local time
        self.assertEqual(proxy.local_time(now + 7500, now), "14:05 (in 2h 05m)")
        self.assertEqual(proxy.local_time(now + 3 * 86400 - 3 * 3600, now),
                         "Thu 09:00 (in 2d 21h)")

    def test_the_page_escapes_what_it_did_not_write_and_loads_nothing(self):
        requests = [{"at": self.NOW, "dialect": "chat", "model": "<script>alert(1)</script>",
                     "seconds": 1.25, "input_tokens": 1460, "output_tokens": 9,
                     "cache_read": 0.9, "status": 200, "error": None},
                    {"at": self.NOW, "dialect": "messages", "model": 'a"b&c', "seconds": 0.01,
                     "input_tokens": 0, "output_tokens": 0, "cache_read": None, "status": 429,
                     "error": "<usage_reserve>"}]
        usage = dict(self.USAGE, windows=dict(self.USAGE["windows"], **{
            "<b>odd</b>": {"utilization": 0.5}}))
        page = proxy.status_page(usage, self.HEALTH, requests, "127.0.0.1:3456", self.NOW)
        self.assertIn("&lt;script&gt;alert(1)&lt;/script&gt;", page)
        self.assertIn("a&quot;b&amp;c", page)
        self.assertIn("429 &lt;usage_reserve&gt;", page)
        self.assertIn("&lt;b&gt;odd&lt;/b&gt;", page)
        for loads in ("<script", "<link", "<img", "src=", "@import", "url(", "http://",
                      "https://"):
            self.assertNotIn(loads, page.lower())
        self.assertIn('<meta http-equiv="refresh" content="30">', page)
        self.assertIn("91%", page)
        self.assertIn("width:91%", page)
        self.assertLess(page.index("messages"), page.index("&lt;script"), "newest first")


class HistoryTest(unittest.TestCase):
    """A conversation as the rows of a session file (conversation_history, session_lines)
    and what the CLI makes of them (the fake's api_messages, which follows 2.1.331)."""

    NAMES = {"get_weather": "mcp__proxy__get_weather"}
    CALL = {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Oslo"}}
    RESULT = {"type": "tool_result", "tool_use_id": "call_1", "content": text("sunny")}
    MODEL = "claude-sonnet-5-5"

    def test_earlier_turns_are_rows_and_the_last_goes_on_stdin(self):
        turns = [("user", text("hi")), ("assistant", text("hello")), ("user", text("and?"))]
        history = proxy.conversation_history(turns, {}, False)
        self.assertEqual(history.rows, [("user", "hi"), turns[1]], "a user's text as a string")
        self.assertEqual(history.stdin, "and?")

    def test_calls_and_results_are_real_blocks_under_the_names_the_model_knows(self):
        turns = [("user", text("weather?")), ("assistant", text("Let me look.") + [self.CALL]),
                 ("user", [self.RESULT])]
        history = proxy.conversation_history(turns, self.NAMES, True)
        call = dict(self.CALL, name="mcp__proxy__get_weather")
        self.assertEqual(history.rows, [("user", "weather?"),
                                        ("assistant", text("Let me look.") + [call]),
                                        ("user", [self.RESULT])])
        self.assertIsNone(history.stdin, "the CLI resumes a turn of results itself")
        # Once answered, that turn is followed by what the CLI added when it resumed it.
        later = proxy.conversation_history(turns + [("assistant", text("Sunny.")),
                                                    ("user", text("thanks"))], self.NAMES, True)
        self.assertEqual(later.rows[2:4], [("user", [self.RESULT]),
                                           ("user", text(proxy.CONTINUE_TEXT))])
        self.assertEqual(later.stdin, "thanks")

    def test_without_tools_calls_and_results_are_text(self):
        turns = [("user", text("weather?")), ("assistant", [self.CALL]),
                 ("user", [self.RESULT, {"type": "text", "text": "so?"}])]
        history = proxy.conversation_history(turns, {}, False)
        self.assertEqual(history.rows[1][1], proxy.tool_text(self.CALL, {}))
        self.assertIsInstance(history.stdin, str, "text alone: no tool block")
        self.assertIn("sunny", history.stdin)

    def test_call_ids_the_api_refuses_are_replaced_alike_in_call_and_result(self):
        odd = "functions.get_weather:0"
        turns = [("user", text("w")), ("assistant", [dict(self.CALL, id=odd)]),
                 ("user", [dict(self.RESULT, tool_use_id=odd)])]
        history = proxy.conversation_history(turns, self.NAMES, True)
        call_id = history.rows[1][1][0]["id"]
        self.assertRegex(call_id, r"^toolu_[0-9a-f]{24}$")
        self.assertEqual(history.rows[2][1][0]["tool_use_id"], call_id)
        self.assertEqual(proxy.wire_tool_id("call_ok-1"), "call_ok-1")

    def test_empty_text_and_empty_turns_are_left_out(self):
        turns = [("user", text("a")), ("assistant", text("  ")), ("user", text("")),
                 ("assistant", text("b")), ("user", text("c"))]
        self.assertEqual(proxy.conversation_history(turns, {}, False).rows,
                         [("user", "a"), ("assistant", text("b"))])

    def test_a_call_of_a_tool_no_longer_offered_keeps_the_bridge_name(self):
        self.assertEqual(proxy.model_tool_name("gone", {}), "mcp__proxy__gone")
        long_name = "x" * 70
        self.assertEqual(proxy.model_tool_name(long_name, {}), proxy.BRIDGE_PREFIX + next(
            iter(proxy.bridge_names([proxy.Tool(long_name, "", {})]))))

    def file_rows(self, history, preamble=None):
        preamble = fake.preamble_rows(self.MODEL) if preamble is None else preamble
        lines = proxy.session_lines(history, preamble, "0" * 8 + "-0000-4000-8000-" + "0" * 12,
                                    "/w", "2.1.331", self.MODEL, 1796000000.5)
        return [json.loads(line) for line in lines.splitlines()]

    def test_the_file_chains_its_rows_with_the_preamble_after_the_first_user_row(self):
        history = proxy.History([("assistant", text("Hi!")), ("user", text("a")),
                                 ("assistant", text("b"))], text("c"))
        rows = self.file_rows(history)
        self.assertEqual([r["type"] for r in rows], ["assistant", "user"] + ["attachment"] * 5 +
                         ["assistant"])
        self.assertEqual([r["parentUuid"] for r in rows], [None] + [r["uuid"] for r in rows[:-1]])
        self.assertEqual({(r["sessionId"], r["cwd"], r["version"], r["timestamp"]) for r in rows},
                         {("00000000-0000-4000-8000-000000000000", "/w", "2.1.331",
                           "2026-11-30T00:53:20.500Z")})
        self.assertEqual(rows[-1]["message"]["content"], text("b"))
        self.assertEqual(rows[-1]["message"]["stop_reason"], "end_turn")
        only_assistant = self.file_rows(proxy.History([("assistant", text("Hi!"))], text("c")))
        self.assertEqual([r["type"] for r in only_assistant], ["assistant"] + ["attachment"] * 5)

    def test_the_preamble_is_learnt_from_the_file_the_cli_wrote(self):
        written = [{"type": "queue-operation"}, {"type": "user", "message": {}}] + \
            fake.preamble_rows(self.MODEL) + [{"type": "assistant"}, {"type": "attachment",
                                                                      "rendered": ["later"]}]
        text_ = "\n".join(json.dumps(r) for r in written) + "\nnot json\n[1]\n"
        learnt = proxy.learnt_preamble(text_)
        self.assertEqual([r["attachment"]["type"] for r in learnt],
                         ["environment", "model", "date"], "the rows that the CLI renders")
        self.assertEqual(learnt[0], {k: v for k, v in fake.preamble_rows(self.MODEL)[0].items()})
        self.assertIsNone(proxy.learnt_preamble('{"type": "user"}\n{"type": "assistant"}\n'))
        self.assertIsNone(proxy.learnt_preamble(""))

    def sent_for(self, turns, tools=True):
        """What the CLI sends for `turns`: a first turn fresh, later ones resumed."""
        history = proxy.conversation_history(turns, self.NAMES, tools)
        if not history.rows:
            return fake.api_messages([], [history.stdin], False, self.MODEL)
        return fake.api_messages(self.file_rows(history), [] if history.stdin is None
                                 else [history.stdin], history.stdin is None, self.MODEL)

    def test_each_request_of_a_conversation_repeats_the_one_before(self):
        """The prompt cache's condition: request N+1 starts with all of request N."""
        steps = [("user", text("Weather in Oslo?")), ("assistant", text("Let me look.") +
                                                     [self.CALL]),
                 ("user", [self.RESULT]), ("assistant", text("Sunny.")),
                 ("user", text("And tomorrow?")), ("assistant", [dict(self.CALL, id="call_2")]),
                 ("user", [dict(self.RESULT, tool_use_id="call_2"), *text("in C please")]),
                 ("assistant", text("Cloudy.")), ("user", text("Thanks!"))]
        previous = None
        for n in range(1, len(steps) + 1):
            if steps[n - 1][0] != "user":
                continue
            messages = self.sent_for(steps[:n])
            if previous is not None:
                self.assertEqual(messages[:len(previous)], previous, "turn %d" % n)
                self.assertGreater(len(messages), len(previous))
            previous = messages
        roles = [m["role"] for m in previous]
        self.assertEqual(roles, ["user", "system", "assistant", "user", "assistant", "user",
                                 "assistant", "user", "assistant", "user"])
        self.assertEqual(previous[3]["content"], [self.RESULT] + text(proxy.CONTINUE_TEXT))
        self.assertEqual(previous[7]["content"], [dict(self.RESULT, tool_use_id="call_2"),
                                                  *text("in C please\n"),
                                                  *text(proxy.CONTINUE_TEXT)])

    def test_user_messages_in_a_row_are_one_turn_with_no_made_up_answer_between(self):
        turns = [("user", text("a")), ("assistant", text("b")), ("user", text("c")),
                 ("user", text("d"))]
        self.assertEqual(self.sent_for(turns)[3:], [{"role": "user", "content": "c\nd"}])
        turns += [("assistant", text("e")), ("user", text("f"))]
        self.assertEqual([m["role"] for m in self.sent_for(turns)],
                         ["user", "system", "assistant", "user", "assistant", "user"])

    def test_the_transcript_repeats_only_what_comes_before_the_conversation(self):
        first = fake.api_messages([], [text("a")], False, self.MODEL)
        second = fake.api_messages([], [proxy.prompt_content([
            ("user", text("a")), ("assistant", text("b")), ("user", text("c"))])], False,
            self.MODEL)
        self.assertNotEqual(second[0], first[0])


class ToolFoldTest(unittest.TestCase):
    """Tool calls and structured output, from the CLI's lines to completion events."""
    PARIS = '[[fake:call:get_weather:{"city": "Paris"}]]'
    OSLO = '[[fake:call:get_time:{"city": "Oslo"}]]'

    def calls(self, events):
        calls, current = [], None
        for event in events:
            if isinstance(event, proxy.ToolCall):
                current = [event.id, event.name, ""]
                calls.append(current)
            elif isinstance(event, proxy.ToolInput):
                current[2] += event.text
        return [(i, n, json.loads(a)) for i, n, a in calls]

    def test_parallel_calls_end_the_answer_with_the_turn(self):
        lines, events = tool_fold(self.PARIS + self.OSLO + "[[fake:reply:Let me check.]]")
        self.assertEqual([(n, a) for _, n, a in self.calls(events)],
                         [("get_weather", {"city": "Paris"}), ("get_time", {"city": "Oslo"})])
        self.assertEqual("".join(e.text for e in events if isinstance(e, proxy.Text)),
                         "Let me check.")
        self.assertEqual((events[-1].stop_reason, events[-1].cut_short), ("tool_use", True))
        self.assertIn("Hello from the fake API.", json.dumps(lines), "the CLI would go on")
        self.assertNotIn(proxy.Text("Hello"), events, "but the answer ends with the turn")
        ids = [i for i, _, _ in self.calls(events)]
        self.assertEqual(ids, [b["id"] for line in lines if line.get("type") == "assistant"
                               for b in line["message"]["content"] if b["type"] == "tool_use"],
                         "the model's own call ids")

    def test_the_denied_call_s_result_may_come_before_the_stream_ends(self):
        """The real CLI prints the `user` line of a denied call before or after its message's
        message_delta (tool_results_after_the_stream): the answer is the same either way."""
        lines, events = tool_fold(self.PARIS + "[[fake:reply:Let me check.]]")
        first_user = next(i for i, line in enumerate(lines) if line.get("type") == "user")
        delta = next(i for i, line in enumerate(lines) if line.get("type") == "stream_event"
                     and line["event"]["type"] == "message_delta")
        self.assertLess(delta, first_user, "the fake's order: the stream ends first")
        early = lines[:delta] + [lines[first_user]] + lines[delta:first_user] + \
            lines[first_user + 1:]
        tools = {"mcp__proxy__get_weather": proxy.Tool("get_weather", "", {"type": "object"})}
        self.assertEqual(list(proxy.completion_events(early, tools=tools)), events)

    def test_a_collected_answer_says_what_the_stream_said(self):
        _, events = tool_fold(self.PARIS)
        body = collected(events)
        call = body["choices"][0]["message"]["tool_calls"][0]
        self.assertEqual(call["function"], {"name": "get_weather",
                                            "arguments": '{"city": "Paris"}'})
        self.assertEqual(body["choices"][0]["finish_reason"], "tool_calls")

    def test_only_the_first_call_without_parallel_calls(self):
        _, events = tool_fold(self.PARIS + self.OSLO, single_call=True)
        self.assertEqual([n for _, n, _ in self.calls(events)], ["get_weather"])
        self.assertEqual(events[-1].stop_reason, "tool_use")

    def test_a_tool_nobody_offered_is_not_handed_back(self):
        _, events = tool_fold('[[fake:call:rm_rf:{"path": "/"}]][[fake:reply:Trying.]]',
                              {"--max-turns": "1"})
        self.assertEqual(self.calls(events), [])
        self.assertEqual("".join(e.text for e in events if isinstance(e, proxy.Text)), "Trying.")
        self.assertIsInstance(events[-1], proxy.Finish)

    def test_max_turns_ends_calls_that_came_whole(self):
        """After a broken stream the CLI prints the turn whole; --max-turns 1 then ends it."""
        lines, _ = tool_fold(self.PARIS, {"--max-turns": "1"})
        start = next(i for i, l in enumerate(lines) if l.get("type") == "stream_event")
        stream_end = max(i for i, l in enumerate(lines) if l.get("type") == "stream_event")
        whole = [l for l in lines if l.get("type") == "assistant"]
        message = dict(whole[0]["message"], id="msg_whole", stop_reason="tool_use")
        message["content"] = [b for l in whole for b in l["message"]["content"]]
        lines = lines[:start] + [dict(whole[0], message=message)] + lines[stream_end + 1:]
        events = list(proxy.completion_events(lines, tools={
            "mcp__proxy__get_weather": proxy.Tool("get_weather", "", {})}))
        self.assertEqual([(n, a) for _, n, a in self.calls(events)],
                         [("get_weather", {"city": "Paris"})])
        self.assertEqual(events[-1].stop_reason, "tool_use")

    def test_structured_output_is_the_answer(self):
        _, events = tool_fold('[[fake:reply:Thinking aloud.]][[fake:structured:{"a": [1]}]]',
                              {"--json-schema": "{}"}, schema={"type": "object"})
        texts = [e.text for e in events if isinstance(e, proxy.Text)]
        self.assertEqual(texts, ['{"a":[1]}'], "only the JSON, as the CLI gives it")
        self.assertEqual(events[-1].stop_reason, "end_turn")
        with self.assertRaises(proxy.APIError) as caught:
            tool_fold("no json", {"--json-schema": "{}"}, schema={"type": "object"})
        self.assertEqual((caught.exception.status, caught.exception.code),
                         (502, "invalid_structured_output"))
        with self.assertRaises(proxy.APIError):
            tool_fold("no json", {"--json-schema": "{}", "--max-turns": "1"},
                      schema={"type": "object"})

    def test_json_the_model_wrote_as_text_is_the_answer_when_it_fits_the_schema(self):
        """Models often answer a request for JSON in plain text instead of through the CLI's
        StructuredOutput tool (the CLI nudges once, then gives up): JSON that fits is what the
        API would have returned, bare or fenced, also when tools ended the run at one turn."""
        schema = {"type": "object", "properties": {"name": {"type": "string"}},
                  "required": ["name"], "additionalProperties": False}
        for said, opts in (('{"name": "Ada"}', {}), ('```json\n{"name": "Ada"}\n```', {}),
                           ('{"name": "Ada"}', {"--max-turns": "1"})):
            _, events = tool_fold("[[fake:reply:%s]]" % said, dict(opts, **{
                "--json-schema": json.dumps(schema)}), schema=schema)
            texts = [e.text for e in events if isinstance(e, proxy.Text)]
            self.assertEqual([json.loads(t) for t in texts], [{"name": "Ada"}], (said, opts))
            self.assertEqual(events[-1].stop_reason, "end_turn")
        for said in ('{"nom": "Ada"}', '{"name": 7}', '["Ada"]', 'Ada', '{"name": "Ada"'):
            with self.assertRaises(proxy.APIError, msg=said) as caught:
                tool_fold("[[fake:reply:%s]]" % said, {"--json-schema": "{}"}, schema=schema)
            self.assertEqual(caught.exception.code, "invalid_structured_output")

    def test_the_schema_check(self):
        pet = {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}},
               "required": ["kind"]}
        schema = {"type": "object", "$defs": {"Pet": pet}, "required": ["name"],
                  "additionalProperties": False, "properties": {
                      "name": {"type": "string", "minLength": 1},
                      "age": {"type": ["integer", "null"], "minimum": 0},
                      "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
                      "pet": {"$ref": "#/$defs/Pet"},
                      "either": {"anyOf": [{"type": "string"}, {"type": "number"}]}}}
        good = [{"name": "a"}, {"name": "a", "age": 3}, {"name": "a", "age": 3.0},
                {"name": "a", "age": None}, {"name": "a", "tags": ["x"]},
                {"name": "a", "pet": {"kind": "cat"}}, {"name": "a", "either": 1.5}]
        bad = [{}, {"name": 1}, {"name": ""}, {"name": "a", "age": -1},
               {"name": "a", "age": 1.5}, {"name": "a", "age": True}, {"name": "a", "x": 1},
               {"name": "a", "tags": ["x", 2]}, {"name": "a", "tags": ["x"] * 3},
               {"name": "a", "pet": {"kind": "cow"}}, {"name": "a", "pet": {}},
               {"name": "a", "either": []}, [], "a", None]
        for value in good:
            self.assertIsNone(proxy.schema_error(value, schema), value)
        for value in bad:
            self.assertIsNotNone(proxy.schema_error(value, schema), value)
        self.assertEqual(proxy.schema_error({"name": "a", "tags": [1]}, schema),
                         "$.tags[0] is not of type string")

    def test_a_call_restreamed_after_a_broken_stream_is_relayed_once(self):
        """The API stream breaks inside a call's input; the CLI streams the turn again: the
        client gets the call once, its input whole, under the first id."""
        def attempt(message_id, call_id, pieces, broken):
            lines = [fake.stream({"type": "message_start", "message": {
                "id": message_id, "model": "m", "usage": fake.usage(12, 1)}}, message_id),
                fake.stream({"type": "content_block_start", "index": 0, "content_block": {
                    "type": "tool_use", "id": call_id, "name": "mcp__proxy__get_weather",
                    "input": {}}}, message_id)]
            lines += [fake.stream({"type": "content_block_delta", "index": 0, "delta": {
                "type": "input_json_delta", "partial_json": p}}, message_id) for p in pieces]
            if broken:
                return lines + [fake.stream({"type": "message_stop"}, message_id,
                                            abandoned_blocks={"from_block_index": 0})]
            return lines + [
                fake.assistant(message_id, "m", {"type": "tool_use", "id": call_id, "name":
                                                 "mcp__proxy__get_weather", "input": {
                                                     "city": "Paris"}}, fake.usage(12, 1)),
                fake.stream({"type": "content_block_stop", "index": 0}, message_id),
                fake.stream({"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                             "usage": {"output_tokens": 9}}, message_id)]
        lines = attempt("m1", "toolu_1", ['{"city"', ': "Pa'], True) + [
            {"type": "system", "subtype": "api_retry"}] + attempt(
            "m2", "toolu_2", ['{"city"', ': "Paris"}'], False)
        events = list(proxy.completion_events(lines, tools={
            "mcp__proxy__get_weather": proxy.Tool("get_weather", "", {})}))
        self.assertEqual(self.calls(events), [("toolu_1", "get_weather", {"city": "Paris"})])
        self.assertEqual(events[-1].stop_reason, "tool_use")
        body = collected(events)
        self.assertEqual(len(body["choices"][0]["message"]["tool_calls"]), 1)

    def test_a_call_without_input_deltas(self):
        message = "m1"
        lines = [fake.stream({"type": "message_start", "message": {
            "id": message, "model": "m", "usage": fake.usage(12, 1)}}, message),
            fake.stream({"type": "content_block_start", "index": 0, "content_block": {
                "type": "tool_use", "id": "toolu_x", "name": "mcp__proxy__get_time",
                "input": {}}}, message),
            fake.assistant(message, "m", {"type": "tool_use", "id": "toolu_x", "name":
                                          "mcp__proxy__get_time", "input": {}}, fake.usage(1, 1)),
            fake.stream({"type": "content_block_stop", "index": 0}, message),
            fake.stream({"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                         "usage": {"output_tokens": 3}}, message)]
        events = list(proxy.completion_events(lines, tools={
            "mcp__proxy__get_time": proxy.Tool("get_time", "", {})}))
        self.assertEqual(self.calls(events), [("toolu_x", "get_time", {})])

    def test_input_text_keeps_what_streamed_when_it_is_the_input(self):
        self.assertEqual(proxy.input_text('{"a":  1}', {"a": 1}), '{"a":  1}')
        self.assertEqual(proxy.input_text('{"a": 2}', {"a": 1}), '{"a": 1}')
        self.assertEqual(proxy.input_text("", {}), "{}")
        self.assertEqual(proxy.input_text('{"a": ', {"a": 1}), '{"a": 1}')


class BridgeTest(unittest.TestCase):
    """The MCP server mode, spoken to over stdio as the CLI speaks to it."""

    def talk(self, lines, tools):
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(tools, f)
        self.addCleanup(os.unlink, f.name)
        done = subprocess.run([sys.executable, "-I", proxy.__file__, "mcp-bridge", f.name],
                              input="".join(l if isinstance(l, str) else json.dumps(l) + "\n"
                                            for l in lines).encode(), capture_output=True,
                              timeout=30)
        self.assertEqual(done.returncode, 0, done.stderr)
        return [json.loads(l) for l in done.stdout.decode().splitlines()]

    def test_it_lists_the_tools_and_runs_none(self):
        tools = [{"name": "get_weather", "description": "W", "inputSchema": {"type": "object"}}]
        replies = self.talk([
            {"jsonrpc": "2.0", "id": "probe", "method": "server/discover", "params": {}},
            {"jsonrpc": "2.0", "id": 0, "method": "initialize",
             "params": {"protocolVersion": "2025-11-25", "capabilities": {}}},
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
            "not json\n", "[1]\n",
            {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
            {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
             "params": {"name": "get_weather", "arguments": {}}},
            {"jsonrpc": "2.0", "id": 3, "method": "ping"}], tools)
        self.assertEqual([r["id"] for r in replies], ["probe", 0, 1, 2, 3], "one per request")
        self.assertEqual(replies[0]["error"]["code"], -32601)
        self.assertEqual(replies[1]["result"]["protocolVersion"], "2025-11-25")
        self.assertEqual(replies[1]["result"]["capabilities"], {"tools": {"listChanged": False}})
        self.assertEqual(replies[2]["result"], {"tools": tools})
        self.assertTrue(replies[3]["result"]["isError"], "a call is never run")
        self.assertEqual(replies[4]["result"], {})

    def test_it_ends_when_the_cli_does(self):
        self.assertEqual(self.talk([], []), [])
        done = subprocess.run([sys.executable, proxy.__file__, "mcp-bridge"],
                              capture_output=True, timeout=30)
        self.assertEqual(done.returncode, 2)


class CompletionEventsTest(unittest.TestCase):
    def events(self, text, stop=()):
        return list(proxy.completion_events(fake_lines(text), stop))

    def test_text_deltas_in_order_with_model_and_usage(self):
        events = self.events("hi [[fake:cache]]")
        self.assertEqual(events[0].model, "claude-opus-5-5")
        self.assertEqual(events[0].usage["input_tokens"], 12, "the input, known at the start")
        self.assertEqual("".join(e.text for e in events if isinstance(e, proxy.Text)),
                         "Hello from the fake API.")
        self.assertEqual([e.text for e in events[1:-1]], ["Hello", " from", " the", " fake", " API."])
        finish = events[-1]
        self.assertEqual(finish.stop_reason, "end_turn")
        self.assertEqual(proxy.openai_usage(finish.usage), {
            "prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29,
            "prompt_tokens_details": {"cached_tokens": 5}})

    def test_thinking_is_not_part_of_the_answer(self):
        events = self.events("[[fake:thinking]]")
        self.assertEqual([e.text for e in events if isinstance(e, proxy.Text)],
                         ["Hello", " from", " the", " fake", " API."])

    def test_a_second_message_is_kept_apart(self):
        text = "".join(e.text for e in self.events("[[fake:twoturns]]")
                       if isinstance(e, proxy.Text))
        self.assertEqual(text, "Let me look.\n\nHello from the fake API.")

    def test_unknown_and_reordered_events_are_tolerated(self):
        lines = fake_lines("[[fake:retry]][[fake:ratelimit_info]]")
        lines.insert(0, {"type": "system", "subtype": "ui_invalidate", "event": "ui.render"})
        lines.insert(3, {"type": "something_new", "data": [1]})
        lines.append({"type": "system", "subtype": "init"})  # after the result: never read
        events = list(proxy.completion_events(lines))
        self.assertEqual(events[-1].stop_reason, "end_turn")
        self.assertEqual(len([e for e in events if isinstance(e, proxy.Start)]), 1)

    def test_stop_sequence_cuts_and_finishes(self):
        events = self.events("[[fake:reply:one two three four]]", stop=[" thr"])
        self.assertEqual("".join(e.text for e in events if isinstance(e, proxy.Text)), "one two")
        self.assertEqual(events[-1].stop_reason, "stop_sequence")
        self.assertTrue(events[-1].cut_short)
        self.assertEqual(proxy.finish_reason(events[-1].stop_reason), "stop")

    def test_max_tokens_with_a_client_limit_ends_at_the_first_cut(self):
        events = list(proxy.completion_events(fake_lines("[[fake:max_tokens]]"),
                                              max_tokens_ends=True))
        self.assertEqual("".join(e.text for e in events if isinstance(e, proxy.Text)),
                         "Hello from the fake API.")
        self.assertEqual((events[-1].stop_reason, events[-1].cut_short), ("max_tokens", True))

    def test_max_tokens_without_a_client_limit_joins_the_resumed_answer(self):
        events = self.events("[[fake:max_tokens]]")
        self.assertEqual("".join(e.text for e in events if isinstance(e, proxy.Text)),
                         "Hello from the fake API. And the rest.")
        self.assertEqual(proxy.finish_reason(events[-1].stop_reason), "stop")
        events = self.events("[[fake:always_max_tokens]]")
        self.assertEqual("".join(e.text for e in events if isinstance(e, proxy.Text)),
                         "Hello from the fake API." * 4)
        self.assertEqual(proxy.finish_reason(events[-1].stop_reason), "length")

    def test_finish_reasons(self):
        self.assertEqual(self.events("[[fake:refusal]]")[-1].stop_reason, "refusal")
        for anthropic, openai in [("end_turn", "stop"), ("stop_sequence", "stop"),
                                  ("max_tokens", "length"), ("refusal", "content_filter"),
                                  (None, "stop")]:
            self.assertEqual(proxy.finish_reason(anthropic), openai)

    def test_result_without_partial_messages_still_answers(self):
        lines = [l for l in fake_lines("hi") if l["type"] != "stream_event"]
        events = list(proxy.completion_events(lines))
        self.assertEqual(events[1], proxy.Text("Hello from the fake API."))

    def test_stream_without_result_is_reported(self):
        lines = [l for l in fake_lines("hi") if l["type"] != "result"]
        with self.assertRaises(proxy.CLIEndedWithoutResult):
            list(proxy.completion_events(lines))

    def error_for(self, text):
        with self.assertRaises(proxy.APIError) as caught:
            list(proxy.completion_events(fake_lines(text), now=1000.0))
        return caught.exception

    def test_errors_are_mapped(self):
        cases = [("[[fake:err401]]", 401, "claude_not_logged_in"),
                 ("[[fake:notloggedin]]", 401, "claude_not_logged_in"),
                 ("[[fake:toolong]]", 400, "context_length_exceeded"),
                 ("[[fake:err529]]", 503, "overloaded"),
                 ("[[fake:err500]]", 502, "upstream_error"),
                 ("[[fake:connrefused]]", 502, "claude_error"),
                 ("[[fake:maxturns]]", 502, "claude_error")]
        for text, status, code in cases:
            error = self.error_for(text)
            self.assertEqual((error.status, error.code), (status, code), text)
        self.assertIn("log in", self.error_for("[[fake:notloggedin]]").message)
        self.assertIn("Reached maximum number of turns", self.error_for("[[fake:maxturns]]").message)

    def test_the_status_outranks_the_text(self):
        def error(status, text):
            return proxy.error_from_result({"type": "result", "subtype": "success",
                                            "is_error": True, "api_error_status": status,
                                            "result": text}).status
        self.assertEqual(error(429, "Usage limit reached; /login to switch account"), 429)
        self.assertEqual(error(None, "Usage limit reached; /login to switch account"), 429)
        self.assertEqual(error(500, "rate limit of the gateway"), 502)
        self.assertEqual(error(None, "Not logged in \u00b7 Please run /login"), 401)

    def test_real_recorded_401_result(self):
        error = proxy.error_from_result(json.loads(REAL_401_RESULT))
        self.assertEqual((error.status, error.type), (401, "authentication_error"))
        self.assertIn("Invalid API key", error.message)

    def test_rate_limit_with_and_without_reset_time(self):
        info = json.loads(REAL_RATE_LIMIT_EVENT)["rate_limit_info"]
        self.assertIsNone(proxy.retry_after_seconds("limited", info, 1000.0))
        rejected = {"status": "rejected", "resetsAt": 1600}
        self.assertEqual(proxy.retry_after_seconds("x", rejected, 1000.0), 600)
        self.assertEqual(proxy.retry_after_seconds("Claude AI usage limit reached|1700000600",
                                                   None, 1700000000.0), 600)
        error = proxy.error_from_result({"type": "result", "subtype": "success", "is_error": True,
                                         "result": "You've hit your limit", "api_error_status": 429},
                                        rejected, now=1000.0)
        self.assertEqual((error.status, error.retry_after), (429, 600))


WORDS = "".join("w%d " % i for i in range(12))  # what [[fake:words:12]] answers
OTHER_WORDS = WORDS.replace("w", "v")  # the same after [[fake:differ]]


def texts(events, kind=proxy.Text):
    return [e.text for e in events if isinstance(e, kind)]


class BrokenStreamTest(unittest.TestCase):
    """When the API stream breaks mid-answer, the CLI recovers (see broken_stream in the fake
    and shared/claude-cli/p-midstream-cut-*); the client gets the answer once, whole."""

    def events(self, text, retries, stop=()):
        with mock.patch.dict(os.environ, {"CLAUDE_CODE_MAX_RETRIES": str(retries)}):
            return list(proxy.completion_events(fake_lines(text), stop))

    def test_the_rest_follows_what_was_streamed_and_nothing_repeats(self):
        for retries, cuts in ((0, ""), (2, ""), (2, "[[fake:cuts:1]]")):
            prompt = "[[fake:words:12]][[fake:cut:5]]" + cuts
            events = self.events(prompt, retries)
            where = "%s with %d retries" % (prompt, retries)
            self.assertEqual("".join(texts(events)), WORDS, where)
            # The first 5 words as they came, then only what the client did not have yet.
            self.assertEqual(texts(events)[:5], ["w0 ", "w1 ", "w2 ", "w3 ", "w4 "], where)
            self.assertEqual(texts(events)[5:], ["w5 w6 w7 w8 w9 w10 w11 "] if not cuts else
                             ["w%d " % i for i in range(5, 12)], where)
            self.assertFalse([e for e in events if isinstance(e, proxy.Revised)], where)
            self.assertEqual(len([e for e in events if isinstance(e, proxy.Start)]), 1, where)
            finish = events[-1]
            self.assertEqual((finish.stop_reason, finish.cut_short), ("end_turn", False), where)
            # The usage of the answer, not the sum over the attempts that broke (the result's).
            self.assertEqual((finish.usage["input_tokens"], finish.usage["output_tokens"]),
                             (12, 9), where)

    def test_an_answer_that_changed_on_retry_is_a_revision(self):
        events = self.events("[[fake:words:12]][[fake:cut:5]][[fake:differ]]", 0)
        revised = [e for e in events if isinstance(e, proxy.Revised)]
        self.assertEqual([r.text for r in revised], [OTHER_WORDS])
        self.assertEqual("".join(texts(events)), "w0 w1 w2 w3 w4 ", "nothing more after it")
        body = collected(events)
        self.assertEqual(body["choices"][0]["message"]["content"], OTHER_WORDS)
        self.assertEqual(body["choices"][0]["finish_reason"], "stop")
        stream = proxy.ChatAnswer(chat_request(), "c", streaming=True)
        with self.assertRaises(proxy.APIError) as caught:
            for event in events:
                stream.feed(event)
        self.assertEqual((caught.exception.status, caught.exception.code), (502, "answer_changed"))

    def test_a_restart_that_changes_words_mid_stream_is_held_then_revised(self):
        lines = [fake.status()]
        first, _, _ = fake.dropped_message("m", [("text", ["a ", "b ", "c ", "d"])], 3)
        second = list(fake.message_events("m", [("text", ["a ", "x ", "y ", "z"])]))
        events = list(proxy.completion_events(lines + first + second + [
            fake.result("m", "a x y z", fake.usage(1, 1))]))
        self.assertEqual(texts(events), ["a ", "b ", "c "], "no delta from the other words")
        self.assertEqual([e.text for e in events if isinstance(e, proxy.Revised)], ["a x y z"])

    def test_after_a_contradiction_nothing_more_is_relayed_until_the_revision(self):
        first, _, _ = fake.dropped_message("m", [("thinking", ["Plan A."]), ("text", ["a"])], 0)
        second = list(fake.message_events("m", [("thinking", ["Plan B."]), ("text", ["b c"])]))
        events = list(proxy.completion_events(first + second + [
            fake.result("m", "b c", fake.usage(1, 1))]))
        self.assertEqual(texts(events, proxy.Thinking), ["Plan A."])
        self.assertEqual(texts(events), [], "the second attempt's text waits for the revision")
        self.assertEqual([e.blocks for e in events if isinstance(e, proxy.Revised)],
                         [(("thinking", "Plan B."), ("text", "b c"))])

    def test_thinking_is_resumed_without_repeats(self):
        events = self.events("[[fake:thinking]][[fake:words:12]][[fake:cut:5]][[fake:cuts:1]]", 0)
        self.assertEqual(texts(events, proxy.Thinking), ["Let me think briefly."])
        self.assertEqual("".join(texts(events)), WORDS)
        self.assertFalse([e for e in events if isinstance(e, proxy.Revised)])

    def test_a_resumed_message_may_leave_out_the_blocks_the_cli_kept(self):
        first, _, kept = fake.dropped_message(
            "m", [("thinking", ["Hmm."]), ("text", ["a ", "b ", "c"])], 1)
        self.assertEqual(kept, 1, "the thinking block survived")
        second = list(fake.message_events("m", [("text", ["a ", "b ", "c"])]))
        events = list(proxy.completion_events(
            first + [fake.synthetic_user(fake.CUT_RESUME)] + second + [
                fake.result("m", "a b c", fake.usage(1, 1))]))
        self.assertEqual((texts(events, proxy.Thinking), "".join(texts(events))),
                         (["Hmm."], "a b c"))
        self.assertFalse([e for e in events if isinstance(e, proxy.Revised)])

    def test_a_stream_that_never_recovers_is_an_error_after_what_was_sent(self):
        fold = proxy.AnswerFold()
        events = []
        with mock.patch.dict(os.environ, {"CLAUDE_CODE_MAX_RETRIES": "0"}):
            lines = fake_lines("[[fake:thinking]][[fake:words:12]][[fake:cut:5]]")
        with self.assertRaises(proxy.APIError) as caught:
            for line in lines:
                events += fold.feed(line)
        self.assertEqual("".join(texts(events)), "w0 w1 w2 w3 w4 ")
        self.assertEqual(caught.exception.status, 502)
        self.assertIn("Connection lost mid-response", caught.exception.message)

    def test_stop_sequences_apply_to_what_the_retry_adds(self):
        events = self.events("[[fake:words:12]][[fake:cut:5]]", 0, stop=["w8"])
        self.assertEqual("".join(texts(events)), "w0 w1 w2 w3 w4 w5 w6 w7 ")
        self.assertEqual((events[-1].stop_reason, events[-1].cut_short), ("stop_sequence", True))
        events = self.events("[[fake:words:12]][[fake:cut:5]][[fake:differ]]", 0, stop=["v8"])
        self.assertEqual([e.text for e in events if isinstance(e, proxy.Revised)],
                         ["v0 v1 v2 v3 v4 v5 v6 v7 "])
        self.assertEqual(events[-1].stop_reason, "stop_sequence")


class RenderTest(unittest.TestCase):
    def test_stream_chunks_follow_openai(self):
        r = proxy.ChatAnswer(chat_request(stream_options={"include_usage": True}), "chatcmpl-1",
                             streaming=True)
        first = parse_sse(r.feed(proxy.Start("claude-x")))[0]
        self.assertEqual(first["choices"][0]["delta"], {"role": "assistant", "content": "",
                                                         "refusal": None})
        self.assertEqual((first["id"], first["object"], first["created"], first["model"]),
                         ("chatcmpl-1", "chat.completion.chunk", r.created, "claude-x"))
        self.assertIsNone(first["usage"])
        text = parse_sse(r.feed(proxy.Text("hi")))[0]
        self.assertEqual(text["choices"][0]["delta"], {"content": "hi"})
        last, usage, done = parse_sse(r.feed(proxy.Finish("max_tokens", {"input_tokens": 3,
                                                                          "output_tokens": 4})))
        self.assertEqual((last["choices"][0]["delta"], last["choices"][0]["finish_reason"]),
                         ({}, "length"))
        self.assertEqual((usage["choices"], usage["usage"]["total_tokens"]), ([], 7))
        self.assertEqual(done, "[DONE]")

    def test_without_include_usage_there_is_no_usage(self):
        r = proxy.ChatAnswer(chat_request(), "c", streaming=True)
        r.feed(proxy.Start("m"))
        chunks = parse_sse(r.feed(proxy.Finish("end_turn", {})))
        self.assertEqual(len(chunks), 2)
        self.assertNotIn("usage", chunks[0])

    def test_thinking_is_reasoning_content(self):
        r = proxy.ChatAnswer(chat_request(), "c", streaming=True)
        r.feed(proxy.Start("m"))
        chunk = parse_sse(r.feed(proxy.Thinking("hmm")))[0]
        self.assertEqual(chunk["choices"][0]["delta"], {"reasoning_content": "hmm"})
        body = collected([proxy.Start("m"), proxy.Thinking("hm"), proxy.Thinking("m"),
                          proxy.Text("a"), proxy.Finish("end_turn", {})])
        self.assertEqual((body["choices"][0]["message"]["content"],
                          body["choices"][0]["message"]["reasoning_content"]), ("a", "hmm"))
        self.assertNotIn("reasoning_content", collected([proxy.Start("m"), proxy.Text("a"),
                                                         proxy.Finish(None, {})])["choices"][0][
            "message"])

    def test_non_streaming_is_the_same_events_collected(self):
        body = collected([proxy.Start("m"), proxy.Text("a"), proxy.Text("b"),
                          proxy.Finish("end_turn", {"output_tokens": 2})])
        self.assertEqual(body["choices"][0]["message"]["content"], "ab")
        self.assertEqual(body["choices"][0]["finish_reason"], "stop")
        self.assertEqual((body["object"], body["model"], body["usage"]["completion_tokens"]),
                         ("chat.completion", "m", 2))


##############################################################################
# The server, with the fake CLI
##############################################################################

class EndpointTest(FakeClaudeMixin, unittest.TestCase):
    def test_health_reports_the_cli(self):
        p = self.start_proxy()
        status, response, body = p.request("GET", "/health")
        self.assertEqual(status, 200)
        self.assertEqual(response.getheader("Server"), "claude-max-proxy/" + proxy.__version__)
        self.assertEqual((body["status"], body["claude"]["path"], body["claude"]["version"]),
                         ("ok", self.fake_path, "2.1.331 (Claude Code)"))
        self.assertEqual(body["requests_in_flight"], 0)

    def test_models(self):
        p = self.start_proxy()
        status, _, body = p.request("GET", "/v1/models")
        self.assertEqual(status, 200)
        ids = {m["id"] for m in body["data"]}
        self.assertTrue({"claude-opus-4", "claude-sonnet-4", "claude-haiku-4", "opus", "sonnet",
                         "haiku"} <= ids)
        self.assertEqual({m["object"] for m in body["data"]}, {"model"})
        status, _, body = p.request("GET", "/v1/models/claude-opus-4")
        self.assertEqual((status, body["id"], body["object"]), (200, "claude-opus-4", "model"))
        status, _, body = p.request("GET", "/v1/models/anthropic/claude-sonnet-4-5")
        self.assertEqual((status, body["id"]), (200, "claude-sonnet-4-5"))
        status, _, body = p.request("GET", "/v1/models/gpt-4")
        self.assertEqual((status, body["error"]["code"]), (404, "model_not_found"))

    def test_unknown_paths_and_methods(self):
        p = self.start_proxy()
        status, _, body = p.request("GET", "/v1/nothing")
        self.assertEqual((status, body["error"]["code"]), (404, "unknown_url"))
        status, response, body = p.request("GET", "/v1/chat/completions")
        self.assertEqual((status, response.getheader("Allow")), (405, "POST, OPTIONS"))
        status, response, body = p.request("DELETE", "/v1/models")
        self.assertEqual((status, response.getheader("Allow")), (405, "GET, HEAD, OPTIONS"))
        self.assertEqual(set(body["error"]), {"message", "type", "param", "code"})

    def test_an_upgraded_cli_is_looked_at_again(self):
        copy = os.path.join(self.tmp, "claude-copy")
        shutil.copy(self.fake_path, copy)
        cli = proxy.ClaudeCLI(copy)
        self.assertEqual(cli.status()[1], "2.1.331 (Claude Code)")
        with open(copy) as f:
            source = f.read().replace('VERSION = "2.1.331', 'VERSION = "2.1.332')
        with open(copy + ".new", "w") as f:
            f.write(source)
        os.chmod(copy + ".new", 0o755)
        os.replace(copy + ".new", copy)
        self.assertEqual(cli.status()[1], "2.1.332 (Claude Code)")
        os.unlink(copy)
        self.assertIsNone(cli.status()[0])
        self.assertIn("not found", cli.status()[2])

    def test_health_does_not_wait_for_a_slow_version_check(self):
        copy = os.path.join(self.tmp, "claude-slow")
        shutil.copy(self.fake_path, copy)
        p = self.start_proxy(claude_bin=copy)
        self.assertEqual(p.request("GET", "/health")[2]["claude"]["version"],
                         "2.1.331 (Claude Code)")
        gate = os.path.join(self.tmp, "version-gate")
        with open(copy) as f:  # an upgrade whose --version answers only once the gate opens
            source = f.read().replace(
                '        print(VERSION)', '        while not os.path.exists(%r):\n'
                '            time.sleep(0.01)\n        print("2.1.332 (Claude Code)")' % gate)
        with open(copy + ".new", "w") as f:
            f.write(source)
        os.chmod(copy + ".new", 0o755)
        os.replace(copy + ".new", copy)
        checking = threading.Thread(target=p.server.claude.status)  # as a chat request would
        checking.start()
        wait_until(lambda: p.server.claude._lock.locked(), what="the version check to begin")
        status, _, body = p.request("GET", "/health")
        self.assertEqual((status, body["claude"]["version"]), (200, "2.1.331 (Claude Code)"))
        open(gate, "w").close()
        checking.join(30)
        self.assertEqual(p.request("GET", "/health")[2]["claude"]["version"],
                         "2.1.332 (Claude Code)")

    def test_missing_cli_is_503_with_instructions_and_health_says_so(self):
        p = Proxy(claude_bin=os.path.join(self.tmp, "no-such-claude"))
        self.addCleanup(p.close)
        status, _, body = p.request("GET", "/health")
        self.assertEqual((status, body["status"]), (503, "unavailable"))
        self.assertIn("not found", body["reason"])
        status, _, body = p.chat()
        self.assertEqual(status, 503)
        self.assertIn("npm install -g @anthropic-ai/claude-code", body["error"]["message"])
        self.assertIn("log in", body["error"]["message"])

    def test_cli_found_on_path_and_in_install_locations(self):
        self.assertEqual(proxy.find_claude(), self.fake_path)
        home = os.path.join(self.tmp, "home")
        local = os.path.join(home, ".local", "bin")
        os.makedirs(local, exist_ok=True)
        shutil.copy(self.fake_path, os.path.join(local, "claude"))
        with mock.patch.dict(os.environ, {"PATH": "/usr/bin:/bin", "HOME": home}):
            self.assertEqual(proxy.find_claude(), os.path.join(local, "claude"))
            self.assertEqual(proxy.find_claude("claude"), None)
        self.assertIsNone(proxy.find_claude(os.path.join(self.tmp, "missing", "claude")))


class ChatTest(FakeClaudeMixin, unittest.TestCase):
    def test_non_streaming_answer(self):
        p = self.start_proxy()
        status, response, body = p.chat("hi [[fake:cache]]")
        self.assertEqual(status, 200, body)
        self.assertEqual(response.getheader("Content-Type"), "application/json")
        self.assertTrue(body["id"].startswith("chatcmpl-"))
        self.assertEqual(response.getheader("X-Request-Id"), body["id"])
        self.assertEqual(body["object"], "chat.completion")
        self.assertEqual(body["model"], "claude-sonnet-5-5")  # what the CLI reported
        self.assertEqual(body["choices"], [{"index": 0, "message": {
            "role": "assistant", "content": "Hello from the fake API.", "refusal": None},
            "logprobs": None, "finish_reason": "stop"}])
        self.assertEqual(body["usage"], {"prompt_tokens": 20, "completion_tokens": 9,
                                         "total_tokens": 29,
                                         "prompt_tokens_details": {"cached_tokens": 5}})
        self.assert_no_cli_left(p)

    def test_the_cli_is_run_safely(self):
        p = self.start_proxy()
        status, _, _ = p.request("POST", "/v1/chat/completions", {
            "model": "anthropic/claude-opus-4-1-20250805", "max_tokens": 77, "messages": [
                {"role": "system", "content": "-be terse\nand kind"},
                {"role": "user", "content": "--help"}]})
        self.assertEqual(status, 200)
        run = self.only_run()
        argv = run["argv"]
        self.assertEqual(argv[argv.index("--model") + 1], "claude-opus-4-1-20250805")
        self.assertEqual(argv[argv.index("--tools") + 1], "")
        self.assertNotIn("--help", argv)  # the prompt travels on stdin only
        self.assertEqual(run["stdin"], [{"type": "user", "message": {"role": "user",
                                                                     "content": "--help"}}])
        self.assertEqual(run["system"], "-be terse\nand kind")
        self.assertEqual(run["env"]["CLAUDE_CODE_MAX_OUTPUT_TOKENS"], "77")
        self.assertEqual(run["env"]["CLAUDE_CODE_DISABLE_AUTO_MEMORY"], "1")
        self.assertIn("--safe-mode", argv)
        shared = os.path.dirname(run["cwd"])
        self.assertEqual(os.path.basename(shared), "claude-max-proxy.%d" % os.getuid())
        self.assertEqual(os.stat(shared).st_mode & 0o777, 0o700)
        self.assertEqual(os.stat(run["cwd"]).st_mode & 0o777, 0o700)
        self.assertEqual(run["cwd_entries"], [], "the working directory is empty")
        private = p.server.workdir
        self.assertTrue(os.path.basename(private).startswith("claude-max-proxy-"))
        self.assertEqual(os.stat(private).st_mode & 0o777, 0o700)
        system_file = argv[argv.index("--append-system-prompt-file") + 1]
        self.assertEqual(os.path.dirname(system_file), private, "in the private directory")
        self.assert_no_cli_left(p)
        self.assertFalse(os.path.exists(system_file), "the system prompt file is removed")
        # The next run, and a restarted daemon's, work in the same directory: the CLI writes
        # its path into the prompt, ahead of the conversation.
        self.assertEqual(p.chat()[0], 200)
        self.assertEqual(self.runs()[-1]["cwd"], run["cwd"])
        self.assertEqual(sorted(os.listdir(private)), ["pid"])
        p.close()
        self.assertFalse(os.path.exists(private), "the private directory goes with the daemon")
        self.assertEqual(self.start_proxy().chat()[0], 200)
        self.assertEqual(self.runs()[-1]["cwd"], run["cwd"])

    def test_a_request_as_openclaw_sends_it(self):
        """OpenClaw 2026.9.6's shape: it streams, sends its 11 tools and tool_choice "auto"
        with every prompt, a ~27 KB system prompt, two user messages in a row (the second a
        parts array), and after a call: assistant (content null + tool_calls), tool, user."""
        p = self.start_proxy()
        tools = [{"type": "function", "function": {
            "name": name, "description": "OpenClaw's %s tool." % name, "parameters": {
                "type": "object", "properties": {"arg": {"type": "string"}},
                "required": ["arg"], "additionalProperties": False}}}
            for name in ("read", "write", "edit", "exec", "process", "web_search", "web_fetch",
                         "browser", "canvas", "message", "sessions_spawn")]
        system = "You are a personal assistant running inside OpenClaw.\n" + "rules " * 4500
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": "[Tue 2026-12-01 09:00 UTC] hello"},
                    {"role": "user", "content": [{"type": "text", "text": (
                        'list my files [[fake:call:exec:{"arg": "ls"}]]')}]}]
        body = {"model": "claude-opus-4", "stream": True, "stream_options": {
            "include_usage": True}, "tools": tools, "tool_choice": "auto", "messages": messages,
            "max_completion_tokens": 8192, "store": False}
        status, _, events = p.request("POST", "/v1/chat/completions", body)
        self.assertEqual(status, 200)
        calls, finish = ChatClient().streamed_calls(parse_sse(events))
        self.assertEqual(([(n, a) for _, n, a in calls], finish),
                         ([("exec", {"arg": "ls"})], "tool"))
        self.assertEqual(len(self.runs()[-1]["mcp_tools"]), 11)
        self.assertTrue(self.runs()[-1]["system"].startswith(system))
        messages += [{"role": "assistant", "content": None, "tool_calls": [
            {"id": calls[0][0], "type": "function", "function": {
                "name": "exec", "arguments": '{"arg": "ls"}'}}]},
            {"role": "tool", "tool_call_id": calls[0][0], "content": "notes.txt"},
            {"role": "user", "content": "thanks"}]
        status, _, events = p.request("POST", "/v1/chat/completions", dict(body,
                                                                           messages=messages))
        self.assertEqual(ChatClient().streamed(parse_sse(events)),
                         ("Tools said: notes.txt", "", "stop", None))
        self.assert_no_cli_left(p)

    def test_the_older_functions_api(self):
        p = self.start_proxy()
        body = chat_body('[[fake:call:get_weather:{"city": "Paris"}]]'
                         '[[fake:call:get_weather:{"city": "Oslo"}]]',
                         functions=[{"name": "get_weather", "parameters": {"type": "object"}}])
        status, _, answer = p.request("POST", "/v1/chat/completions", body)
        choice = answer["choices"][0]
        self.assertEqual((choice["finish_reason"], choice["message"]["function_call"]),
                         ("function_call", {"name": "get_weather",
                                            "arguments": '{"city": "Paris"}'}))
        self.assertNotIn("tool_calls", choice["message"])
        self.assertIn("at most one tool", self.runs()[-1]["system"])
        status, _, raw = p.request("POST", "/v1/chat/completions", dict(body, stream=True))
        deltas = [c["choices"][0]["delta"] for c in parse_sse(raw)[:-1] if c["choices"]]
        pieces = [d["function_call"] for d in deltas if "function_call" in d]
        self.assertEqual(pieces[0], {"name": "get_weather", "arguments": ""})
        self.assertEqual("".join(p["arguments"] for p in pieces), '{"city": "Paris"}')
        status, _, answer = p.request("POST", "/v1/chat/completions", dict(
            body, messages=body["messages"] + [choice["message"], {
                "role": "function", "name": "get_weather", "content": "sunny"}]))
        self.assertEqual(answer["choices"][0]["message"]["content"], "Tools said: sunny")

    def test_what_a_killed_daemon_left_is_swept_at_start(self):
        root = tempfile.mkdtemp(prefix="proxy-sweep-")
        self.addCleanup(shutil.rmtree, root, True)
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        dirs = {}
        for name, pid, age in (("dead", gone.pid, 0), ("alive", os.getppid(), 0),
                               ("old", None, 2 * 86400), ("new", None, 0),
                               ("garbage", "x", 0)):
            path = dirs[name] = os.path.join(root, "claude-max-proxy-" + name)
            os.makedirs(os.path.join(path, "cwd"))
            if pid is not None:
                with open(os.path.join(path, "pid"), "w") as f:
                    f.write(str(pid))
            os.utime(path, (time.time() - age, time.time() - age))
        os.mkdir(os.path.join(root, "other-dir"))
        with mock.patch.object(tempfile, "tempdir", root):
            removed = proxy.sweep_workdirs()
            p = self.start_proxy()
        self.assertEqual(sorted(removed), sorted([dirs["dead"], dirs["old"]]))
        self.assertEqual(sorted(os.listdir(root)), sorted([
            "claude-max-proxy-alive", "claude-max-proxy-new", "claude-max-proxy-garbage",
            "other-dir", os.path.basename(p.server.workdir),
            "claude-max-proxy.%d" % os.getuid()]))
        with open(os.path.join(p.server.workdir, "pid")) as f:
            self.assertEqual(int(f.read()), os.getpid())

    def test_user_settings_reach_the_cli_only_when_asked_for(self):
        p = self.start_proxy(user_settings=True)
        self.assertEqual(p.chat()[0], 200)
        argv = self.only_run()["argv"]
        self.assertEqual(argv[argv.index("--setting-sources") + 1], "user")
        self.assertNotIn("--safe-mode", argv)

    def test_a_large_prompt_goes_through_stdin(self):
        p = self.start_proxy()
        big = "x" * (3 * 1024 * 1024)
        status, _, body = p.chat(big + " [[fake:reply:ok]]")
        self.assertEqual((status, body["choices"][0]["message"]["content"]), (200, "ok"))
        self.assertEqual(len(self.only_run()["stdin"][0]["message"]["content"]), len(big) + 18)

    def test_conversation_and_images_reach_the_cli(self):
        p = self.start_proxy()
        status, _, _ = p.request("POST", "/v1/chat/completions", {"model": "haiku", "messages": [
            {"role": "user", "content": "first"}, {"role": "assistant", "content": "second"},
            {"role": "user", "content": [{"type": "text", "text": "third"}, {
                "type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG_1PX}}]}]})
        self.assertEqual(status, 200)
        content = self.only_run()["stdin"][0]["message"]["content"]
        self.assertIn('<message role="assistant">\nsecond\n</message>', content[0]["text"])
        self.assertEqual(content[1]["source"]["data"], PNG_1PX)

    def test_streaming_follows_openai(self):
        p = self.start_proxy()
        status, response, events = p.stream("hi", stream_options={"include_usage": True})
        self.assertEqual(status, 200)
        self.assertEqual(response.getheader("Content-Type"), "text/event-stream; charset=utf-8")
        self.assertEqual(response.getheader("Transfer-Encoding"), "chunked")
        self.assertEqual(events[-1], "[DONE]")
        chunks = events[:-1]
        self.assertEqual(len({c["id"] for c in chunks}), 1)
        self.assertEqual({c["model"] for c in chunks}, {"claude-sonnet-5-5"})
        self.assertEqual(chunks[0]["choices"][0]["delta"]["role"], "assistant")
        texts = [c["choices"][0]["delta"].get("content") for c in chunks[1:-2]]
        self.assertEqual(texts, ["Hello", " from", " the", " fake", " API."])
        self.assertEqual((chunks[-2]["choices"][0]["delta"],
                          chunks[-2]["choices"][0]["finish_reason"]), ({}, "stop"))
        self.assertEqual((chunks[-1]["choices"], chunks[-1]["usage"]["completion_tokens"]),
                         ([], 9))
        self.assert_no_cli_left(p)

    def test_deltas_are_relayed_as_they_arrive(self):
        """The first words reach the client while the CLI is still writing the rest."""
        p = self.start_proxy()
        conn = p.connect()
        conn.request("POST", "/v1/chat/completions", body=json.dumps({
            "model": "sonnet", "stream": True,
            "messages": [{"role": "user", "content": "[[fake:drip:0.05]]"}]}),
            headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        self.assertEqual(response.status, 200)
        seen = []
        while len(seen) < 6:
            line = response.readline()
            self.assertTrue(line, "the stream ended after %d events" % len(seen))
            if line.startswith(b"data: "):
                seen.append(json.loads(line[6:]))
        run = self.only_run()
        self.assertTrue(alive(run["pid"]), "the CLI is still answering")  # drip never ends
        self.assertEqual(seen[1]["choices"][0]["delta"]["content"], "Hello")
        conn.close()
        self.assert_no_cli_left(p)

    def test_stop_sequences_cut_the_answer_and_end_the_cli(self):
        p = self.start_proxy()
        status, _, body = p.chat("[[fake:drip:0.01]]", stop=["fake"])
        self.assertEqual(status, 200)
        self.assertEqual(body["choices"][0]["message"]["content"], "Hello from the ")
        self.assertEqual(body["choices"][0]["finish_reason"], "stop")
        self.assert_no_cli_left(p)
        status, _, events = p.stream("[[fake:drip:0.01]]", stop=[" the f", "zzz"])
        self.assertEqual("".join(c["choices"][0]["delta"].get("content", "")
                                 for c in events[:-1]), "Hello from")
        self.assertEqual(events[-2]["choices"][0]["finish_reason"], "stop")
        self.assert_no_cli_left(p)

    def test_max_tokens_is_honoured(self):
        p = self.start_proxy()
        _, _, body = p.chat("[[fake:max_tokens]][[fake:slow:0.01]]", max_tokens=5)
        self.assertEqual((body["choices"][0]["message"]["content"],
                          body["choices"][0]["finish_reason"]), ("Hello from the fake API.",
                                                                 "length"))
        _, _, events = p.stream("[[fake:max_tokens]]", max_tokens=5)
        self.assertEqual(events[-2]["choices"][0]["finish_reason"], "length")
        _, _, body = p.chat("[[fake:max_tokens]]")  # no client limit: the whole answer
        self.assertEqual((body["choices"][0]["message"]["content"],
                          body["choices"][0]["finish_reason"]),
                         ("Hello from the fake API. And the rest.", "stop"))
        _, _, body = p.chat("[[fake:always_max_tokens]]")
        self.assertEqual(body["choices"][0]["finish_reason"], "length")
        self.assert_no_cli_left(p)

    def test_noise_from_the_cli_is_skipped(self):
        p = self.start_proxy()
        status, _, body = p.chat("[[fake:garbage]][[fake:retry]][[fake:ratelimit_info]]")
        self.assertEqual((status, body["choices"][0]["message"]["content"]),
                         (200, "Hello from the fake API."))

    def test_bad_requests(self):
        p = self.start_proxy()
        status, _, body = p.request("POST", "/v1/chat/completions", raw=b"{not json")
        self.assertEqual((status, body["error"]["type"]), (400, "invalid_request_error"))
        status, _, body = p.request("POST", "/v1/chat/completions", raw=b"\xff\xfe")
        self.assertEqual(status, 400)
        status, _, body = p.request("POST", "/v1/chat/completions", {"model": "gpt-4o",
                                                                     "messages": []})
        self.assertEqual((status, body["error"]["code"]), (404, "model_not_found"))
        status, _, body = p.chat(max_tokens="lots")
        self.assertEqual((status, body["error"]["param"]), (400, "max_tokens"))
        status, _, body = p.request("POST", "/v1/chat/completions", {"model": "opus"},
                                    headers={"Content-Type": "text/plain"})
        self.assertEqual(status, 415)
        status, _, body = p.chat(tools=[{"type": "function", "function": {"name": "x y"}}])
        self.assertEqual((status, body["error"]["param"]), (400, "tools[0].function.name"))
        self.assertEqual(self.runs(), [], "no CLI is started for a bad request")

class ErrorTest(FakeClaudeMixin, unittest.TestCase):
    def test_cli_errors_become_http_errors(self):
        p = self.start_proxy()
        cases = [("[[fake:notloggedin]]", 401, "authentication_error"),
                 ("[[fake:err401]]", 401, "authentication_error"),
                 ("[[fake:toolong]]", 400, "invalid_request_error"),
                 ("[[fake:err529]]", 503, "server_error"),
                 ("[[fake:err500]]", 502, "server_error"),
                 ("[[fake:connrefused]]", 502, "server_error")]
        for stream in (False, True):
            for prompt, status, kind in cases:
                code, _, body = p.stream(prompt) if stream else p.chat(prompt)
                self.assertEqual(code, status, (prompt, stream, body))
                self.assertEqual(body["error"]["type"], kind)
                self.assertNotIn("choices", body)
        self.assert_no_cli_left(p)

    def test_rate_limit_says_when_to_retry(self):
        p = self.start_proxy()
        status, response, body = p.chat("[[fake:ratelimit:120]]")
        self.assertEqual((status, body["error"]["code"]), (429, "rate_limit_exceeded"))
        self.assertTrue(100 <= int(response.getheader("Retry-After")) <= 120)

    def test_cli_that_exits_without_answer_is_502_with_its_stderr(self):
        p = self.start_proxy()
        status, _, body = p.chat("[[fake:exit:2]]")
        self.assertEqual(status, 502)
        self.assertIn("code 2", body["error"]["message"])
        self.assertIn("something broke before answering", body["error"]["message"])
        self.assert_no_cli_left(p)

    def test_cli_that_dies_mid_stream_ends_the_stream_with_an_error(self):
        p = self.start_proxy()
        status, _, events = p.stream("[[fake:diemid]]")
        self.assertEqual(status, 200)
        self.assertEqual(events[-1]["error"]["type"], "server_error")
        self.assertIn("lost the connection mid-stream", events[-1]["error"]["message"])
        self.assertNotIn("[DONE]", events)
        self.assertIn("Hello", [e["choices"][0]["delta"].get("content") for e in events[:-1]])
        status, _, body = p.chat("[[fake:diemid]]")
        self.assertEqual(status, 502)
        self.assert_no_cli_left(p)

    def test_long_lines_pass_and_enormous_ones_end_the_cli(self):
        p = self.start_proxy()
        status, _, body = p.chat("[[fake:bigdelta:3000000]]")
        self.assertEqual(status, 200)
        self.assertEqual(body["choices"][0]["message"]["content"], "x" * 3000000)
        with mock.patch.object(proxy, "MAX_CLI_LINE_BYTES", 100000):
            status, _, body = p.chat("[[fake:bigdelta:200000]]")
        self.assertEqual((status, body["error"]["code"]), (502, "claude_error"))
        self.assertIn("longer than 100000 bytes", body["error"]["message"])
        self.assert_no_cli_left(p)

    def test_idle_timeout_is_504(self):
        p = self.start_proxy(idle_timeout=0.5)
        status, _, body = p.chat("[[fake:silent]][[fake:child]]")
        self.assertEqual((status, body["error"]["code"]), (504, "timeout"))
        self.assertIn("printed nothing", body["error"]["message"])
        self.assert_no_cli_left(p)

    def test_whole_request_timeout_is_504_or_a_final_error_event(self):
        p = self.start_proxy(timeout=2.0)
        status, _, body = p.chat("[[fake:drip:0.05]]")
        self.assertEqual((status, body["error"]["code"]), (504, "timeout"))
        status, _, events = p.stream("[[fake:drip:0.05]]")
        self.assertEqual((status, events[-1]["error"]["code"]), (200, "timeout"))
        status, _, body = p.stream("[[fake:hang]]")
        self.assertEqual(status, 504)
        self.assert_no_cli_left(p)


class BrokenStreamServerTest(FakeClaudeMixin, unittest.TestCase):
    """The API stream breaks mid-answer: the client gets the answer once and whole, or, when
    the retry said other words than those already streamed, a final error event."""

    RECOVERED = [("[[fake:cut:5]]", 0), ("[[fake:cut:5]]", 2), ("[[fake:cut:5]][[fake:cuts:1]]", 2),
                 ("[[fake:thinking]][[fake:cut:5]][[fake:cuts:1]]", 0)]

    def ask(self, p, prompt, retries):
        """(the collected answer, the streamed answer) as (status, body or SSE events)."""
        with mock.patch.dict(os.environ, {"CLAUDE_CODE_MAX_RETRIES": str(retries)}):
            status, _, body = p.chat("[[fake:words:12]]" + prompt)
            streamed = p.stream("[[fake:words:12]]" + prompt, stream_options={
                "include_usage": True})
        return (status, body), (streamed[0], streamed[2])

    def test_the_answer_arrives_once_and_whole(self):
        p = self.start_proxy()
        for prompt, retries in self.RECOVERED:
            where = "%s with %d retries" % (prompt, retries)
            (status, body), (stream_status, events) = self.ask(p, prompt, retries)
            self.assertEqual((status, body["choices"][0]["message"]["content"]), (200, WORDS),
                             where)
            self.assertEqual((body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]),
                             (12, 9), where)
            self.assertEqual((stream_status, events[-1]), (200, "[DONE]"), where)
            chunks = [c for c in events[:-1] if c["choices"]]
            self.assertEqual("".join(c["choices"][0]["delta"].get("content", "")
                                     for c in chunks), WORDS, where)
            self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "stop", where)
            self.assertEqual(events[-2]["usage"]["completion_tokens"], 9, where)
        self.assert_no_cli_left(p)

    def test_an_answer_that_changed_ends_the_stream_with_an_error(self):
        p = self.start_proxy()
        (status, body), (stream_status, events) = self.ask(p, "[[fake:cut:5]][[fake:differ]]", 0)
        self.assertEqual((status, body["choices"][0]["message"]["content"]), (200, OTHER_WORDS))
        self.assertEqual(stream_status, 200)
        self.assertNotIn("[DONE]", events)
        self.assertEqual(events[-1]["error"]["code"], "answer_changed")
        self.assertEqual("".join(c["choices"][0]["delta"].get("content", "")
                                 for c in events[:-1]), "w0 w1 w2 w3 w4 ")
        self.assert_no_cli_left(p)

    def test_a_stream_that_never_recovers_is_never_a_silent_cut(self):
        p = self.start_proxy()
        (status, body), (stream_status, events) = self.ask(
            p, "[[fake:thinking]][[fake:cut:5]]", 0)
        self.assertEqual(status, 502, body)
        self.assertIn("Connection lost mid-response", body["error"]["message"])
        self.assertEqual(stream_status, 200)
        self.assertNotIn("[DONE]", events)
        self.assertIn("Connection lost mid-response", events[-1]["error"]["message"])
        self.assert_no_cli_left(p)


def parse_named_sse(data):
    """[(event name, payload)] of a stream with `event:` lines (Anthropic's and Responses'):
    every event has exactly one `event:` and one `data:` line, and its name is its type."""
    events = []
    for block in data.decode("utf-8").split("\n\n"):
        if not block.strip():
            continue
        lines = block.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and \
            lines[1].startswith("data: "), block
        name, payload = lines[0][len("event: "):], json.loads(lines[1][len("data: "):])
        assert payload.get("type") == name, block
        events.append((name, payload))
    return events


class ChatClient:
    """How the tests speak each dialect: a request body, and what an answer, a stream and an
    error say in neutral terms (text, thinking, finish "stop" or "length", error message)."""
    path = "/v1/chat/completions"
    FIELDS = ("stream_options", "max_tokens", "max_completion_tokens", "stop", "n",
              "temperature", "top_p", "logprobs", "tools", "tool_choice", "response_format",
              "reasoning_effort", "functions", "function_call", "user", "seed")
    NESTED = (("stream_options", {"include_usage": "yes"}), ("reasoning_effort", ["high"]),
              ("messages", [{"role": "user", "content": [{"type": "image_url",
                                                          "image_url": {"url": 7}}]}]),
              ("tools", [{"type": "function", "function": {"name": 7}}]),
              ("response_format", {"type": "json_schema", "json_schema": {"schema": 7}}))

    def body(self, content, stream=False, stop=None, max_tokens=None):
        body = chat_body(content, stream=stream)
        body.update({k: v for k, v in (("stop", stop), ("max_tokens", max_tokens)) if v})
        return body

    def answer(self, body):
        message = body["choices"][0]["message"]
        return (message["content"], message.get("reasoning_content", ""),
                body["choices"][0]["finish_reason"])

    def error(self, body):
        return body["error"]["message"]

    def parse_stream(self, data):
        return parse_sse(data)

    def streamed(self, events):
        """(text, thinking, finish or None, the final error's message or None)."""
        deltas = [c["choices"][0]["delta"] for c in events if isinstance(c, dict) and
                  c.get("choices")]
        finish = [c["choices"][0]["finish_reason"] for c in events if isinstance(c, dict) and
                  c.get("choices") and c["choices"][0]["finish_reason"]]
        error = events[-1]["error"]["message"] if isinstance(events[-1], dict) and \
            "error" in events[-1] else None
        return ("".join(d.get("content") or "" for d in deltas),
                "".join(d.get("reasoning_content") or "" for d in deltas),
                finish[0] if finish and events[-1] == "[DONE]" else None, error)

    def check_order(self, test, events):
        test.assertEqual(events[0]["choices"][0]["delta"]["role"], "assistant")
        test.assertEqual(events[-1], "[DONE]")
        test.assertTrue(events[-2]["choices"][0]["finish_reason"])

    # Function calling: tools are (name, description, JSON schema); a call is (id, name, input).
    def with_tools(self, body, tools, choice=None, schema=None):
        body["tools"] = [{"type": "function", "function": {
            "name": name, "description": about, "parameters": params}}
            for name, about, params in tools]
        if choice is not None:
            body["tool_choice"] = {"type": "function", "function": {"name": choice}} \
                if choice not in ("auto", "none", "required") else choice
        if schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "answer", "schema": schema}}
        return body

    def calls(self, body):
        """(the calls of a whole answer, its finish: "tool" when it stopped to call)."""
        choice = body["choices"][0]
        calls = [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
                 for c in choice["message"].get("tool_calls") or []]
        assert calls == [] or choice["message"]["content"] is None, body
        return calls, {"tool_calls": "tool"}.get(choice["finish_reason"],
                                                 choice["finish_reason"])

    def streamed_calls(self, events):
        calls = {}
        finish = None
        for chunk in events:
            if not isinstance(chunk, dict) or not chunk.get("choices"):
                continue
            for piece in chunk["choices"][0]["delta"].get("tool_calls") or []:
                if "id" in piece:  # the first piece of a call names it, as OpenAI streams
                    assert piece["index"] == len(calls), piece
                    calls[piece["index"]] = [piece["id"], piece["function"]["name"], ""]
                calls[piece["index"]][2] += piece["function"]["arguments"]
            finish = chunk["choices"][0]["finish_reason"] or finish
        return [(i, n, json.loads(a)) for i, n, a in calls.values()], \
            {"tool_calls": "tool"}.get(finish, finish)

    def follow_up(self, body, answer, results):
        """The next request: the history so far, the answer's calls and their results."""
        body = dict(body, messages=body["messages"] + [answer["choices"][0]["message"]] + [
            {"role": "tool", "tool_call_id": call_id, "content": text}
            for call_id, text in results])
        return body


class MessagesClient(ChatClient):
    path = "/v1/messages"
    FIELDS = ("system", "max_tokens", "stop_sequences", "thinking", "output_config", "metadata",
              "temperature", "top_p", "top_k", "tools", "tool_choice", "mcp_servers",
              "service_tier", "context_management")
    NESTED = (("thinking", {"type": []}), ("output_config", {"effort": {}}),
              ("output_config", {"format": {"type": "json_schema", "schema": []}}),
              ("tools", [{"name": "t", "input_schema": []}]),
              ("tool_choice", {"type": "tool", "name": "absent"}),
              ("system", [{"type": "text", "text": 7}]),
              ("messages", [{"role": "user", "content": [{"type": "image", "source": {
                  "type": "base64", "media_type": "image/png", "data": 7}}]}]))
    FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length"}

    def body(self, content, stream=False, stop=None, max_tokens=None):
        body = {"model": "claude-opus-5-5", "max_tokens": max_tokens or 1000, "stream": stream,
                "messages": [{"role": "user", "content": content}]}
        if stop:
            body["stop_sequences"] = stop
        return body

    def answer(self, body):
        self.test_shape(body)
        blocks = body["content"]
        return ("".join(b["text"] for b in blocks if b["type"] == "text"),
                "".join(b["thinking"] for b in blocks if b["type"] == "thinking"),
                self.FINISH[body["stop_reason"]])

    @staticmethod
    def test_shape(body):
        assert body["type"] == "message" and body["id"].startswith("msg_"), body
        assert set(body["usage"]) >= {"input_tokens", "output_tokens",
                                      "cache_creation_input_tokens",
                                      "cache_read_input_tokens"}, body

    def error(self, body):
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
        return body["error"]["message"]

    def parse_stream(self, data):
        return parse_named_sse(data)

    def streamed(self, events):
        deltas = [e["delta"] for name, e in events if name == "content_block_delta"]
        stop = [e["delta"]["stop_reason"] for name, e in events if name == "message_delta"]
        error = events[-1][1]["error"]["message"] if events[-1][0] == "error" else None
        return ("".join(d.get("text", "") for d in deltas),
                "".join(d.get("thinking", "") for d in deltas),
                self.FINISH[stop[0]] if stop and events[-1][0] == "message_stop" else None, error)

    def check_order(self, test, events):
        names = [name for name, _ in events]
        test.assertEqual(names[:2], ["message_start", "ping"])
        test.assertEqual(names[-2:], ["message_delta", "message_stop"])
        index = -1
        for name, event in events[2:-2]:  # blocks, each started, filled and stopped in turn
            if name == "content_block_start":
                test.assertEqual(event["index"], index + 1)
                index = event["index"]
            else:
                test.assertIn(name, ("content_block_delta", "content_block_stop"))
                test.assertEqual(event["index"], index)
        test.assertEqual(names[-3], "content_block_stop")

    def with_tools(self, body, tools, choice=None, schema=None):
        body["tools"] = [{"name": name, "description": about, "input_schema": params}
                         for name, about, params in tools]
        if choice is not None:
            body["tool_choice"] = {"type": "tool", "name": choice} if choice not in (
                "auto", "none", "required") else {"type": {"required": "any"}.get(choice,
                                                                                 choice)}
        if schema is not None:
            body["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
        return body

    def calls(self, body):
        self.test_shape(body)
        calls = [(b["id"], b["name"], b["input"]) for b in body["content"]
                 if b["type"] == "tool_use"]
        return calls, {"tool_use": "tool"}.get(body["stop_reason"],
                                               self.FINISH.get(body["stop_reason"]))

    def streamed_calls(self, events):
        calls, stop = {}, None
        for name, event in events:
            if name == "content_block_start" and event["content_block"]["type"] == "tool_use":
                block = event["content_block"]
                assert block["input"] == {}, block
                calls[event["index"]] = [block["id"], block["name"], ""]
            elif name == "content_block_delta" and event["delta"]["type"] == "input_json_delta":
                calls[event["index"]][2] += event["delta"]["partial_json"]
            elif name == "message_delta":
                stop = event["delta"]["stop_reason"]
        return [(i, n, json.loads(a)) for i, n, a in calls.values()], \
            {"tool_use": "tool"}.get(stop, self.FINISH.get(stop))

    def follow_up(self, body, answer, results):
        return dict(body, messages=body["messages"] + [
            {"role": "assistant", "content": answer["content"]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call_id,
                                          "content": text} for call_id, text in results]}])


class ResponsesClient(ChatClient):
    path = "/v1/responses"
    FIELDS = ("instructions", "max_output_tokens", "reasoning", "text", "tools", "store",
              "previous_response_id", "metadata", "background", "temperature", "top_p",
              "include", "user", "parallel_tool_calls", "prompt_cache_key", "tool_choice")
    NESTED = (("text", {"format": "json"}), ("reasoning", {"effort": []}),
              ("tools", [{"type": "namespace", "name": "n", "tools": 7}]),
              ("tools", [{"type": "function", "name": "f", "parameters": {"type": "string"}}]),
              ("input", [{"role": "user", "content": [{"type": "input_image",
                                                       "image_url": {"url": "x"}}]}]),
              ("input", [{"role": [], "content": "x"}]))

    def body(self, content, stream=False, stop=None, max_tokens=None):
        body = {"model": "claude-sonnet-4", "input": content, "stream": stream}
        if max_tokens:
            body["max_output_tokens"] = max_tokens
        return body

    def answer(self, body):
        assert body["object"] == "response" and body["id"].startswith("resp_"), body
        items = body["output"]
        text = "".join(p["text"] for i in items if i["type"] == "message" for p in i["content"])
        thinking = "".join(p["text"] for i in items if i["type"] == "reasoning"
                           for p in i["summary"])
        return text, thinking, {"completed": "stop", "incomplete": "length"}[body["status"]]

    def error(self, body):
        return body["error"]["message"]

    def parse_stream(self, data):
        return parse_named_sse(data)

    def streamed(self, events):
        text = "".join(e["delta"] for name, e in events if name == "response.output_text.delta")
        thinking = "".join(e["delta"] for name, e in events
                           if name == "response.reasoning_summary_text.delta")
        last, final = events[-1]
        finish = {"response.completed": "stop", "response.incomplete": "length"}.get(last)
        return (text, thinking, finish,
                final["response"]["error"]["message"] if last == "response.failed" else None)

    def check_order(self, test, events):
        names = [name for name, _ in events]
        test.assertEqual([e["sequence_number"] for _, e in events], list(range(len(events))))
        test.assertEqual(names[:2], ["response.created", "response.in_progress"])
        text = [n for n in names if not n.startswith("response.reasoning")][2:]
        test.assertEqual(text[:2], ["response.output_item.added", "response.content_part.added"])
        test.assertEqual(set(text[2:-4]), {"response.output_text.delta"})
        test.assertEqual(text[-4:], ["response.output_text.done", "response.content_part.done",
                                     "response.output_item.done", "response.completed"])
        final = events[-1][1]["response"]
        test.assertEqual(final["output"][-1]["content"][0]["text"], self.streamed(events)[0])

    def with_tools(self, body, tools, choice=None, schema=None):
        body["tools"] = [{"type": "function", "name": name, "description": about,
                          "parameters": params} for name, about, params in tools]
        if choice is not None:
            body["tool_choice"] = {"type": "function", "name": choice} if choice not in (
                "auto", "none", "required") else choice
        if schema is not None:
            body["text"] = {"format": {"type": "json_schema", "name": "answer",
                                       "schema": schema}}
        return body

    def calls(self, body):
        calls = [(i["call_id"], i["name"], json.loads(i["arguments"])) for i in body["output"]
                 if i["type"] == "function_call"]
        finish = "tool" if calls else {"completed": "stop", "incomplete": "length"}[
            body["status"]]
        return calls, finish

    def streamed_calls(self, events):
        items, arguments, final = {}, {}, None
        for name, event in events:
            if name == "response.output_item.added" and event["item"]["type"] == "function_call":
                items[event["item"]["id"]] = event["item"]
                arguments[event["item"]["id"]] = ""
            elif name == "response.function_call_arguments.delta":
                arguments[event["item_id"]] += event["delta"]
            elif name == "response.function_call_arguments.done":
                assert event["arguments"] == arguments[event["item_id"]], event
            elif name == "response.completed":
                final = event["response"]
        calls = [(item["call_id"], item["name"], json.loads(arguments[key]))
                 for key, item in items.items()]
        return calls, "tool" if calls and final else "stop" if final else None

    def follow_up(self, body, answer, results):
        return dict(body, input=[], previous_response_id=answer["id"]) if not results else \
            dict(body, previous_response_id=answer["id"], input=[
                {"type": "function_call_output", "call_id": call_id, "output": text}
                for call_id, text in results])


class DialectContract(FakeClaudeMixin):
    """What every dialect does, written once; a subclass per dialect names its client."""
    client = ChatClient()
    ANSWER = "Hello from the fake API."

    def setUp(self):
        super().setUp()
        self.p = self.start_proxy()

    def ask(self, content, **options):
        """(status, answer (text, thinking, finish) or the error's message)."""
        status, _, body = self.p.request("POST", self.client.path,
                                         self.client.body(content, **options))
        return status, self.client.answer(body) if status == 200 else self.client.error(body)

    def ask_stream(self, content, **options):
        """(status, the parsed events, or the error's message)."""
        conn = self.p.connect()
        try:
            conn.request("POST", self.client.path, body=json.dumps(self.client.body(
                content, stream=True, **options)), headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        if response.status != 200:
            return response.status, self.client.error(json.loads(data))
        self.assertTrue(response.getheader("Content-Type").startswith("text/event-stream"))
        return 200, self.client.parse_stream(data)

    def test_an_answer(self):
        self.assertEqual(self.ask("hi"), (200, (self.ANSWER, "", "stop")))
        self.assert_no_cli_left(self.p)

    def test_a_stream_in_the_dialects_order(self):
        status, events = self.ask_stream("hi")
        self.assertEqual(status, 200)
        self.client.check_order(self, events)
        self.assertEqual(self.client.streamed(events), (self.ANSWER, "", "stop", None))
        self.assert_no_cli_left(self.p)

    def test_thinking_is_relayed(self):
        self.assertEqual(self.ask("[[fake:thinking]]"),
                         (200, (self.ANSWER, "Let me think briefly.", "stop")))
        status, events = self.ask_stream("[[fake:thinking]]")
        self.assertEqual(self.client.streamed(events),
                         (self.ANSWER, "Let me think briefly.", "stop", None))

    def test_stop_sequences_cut_the_answer(self):
        if self.client.path == "/v1/responses":
            self.skipTest("the Responses API has no stop sequences")
        self.assertEqual(self.ask("hi", stop=[" the"]), (200, ("Hello from", "", "stop")))
        status, events = self.ask_stream("hi", stop=[" the"])
        self.assertEqual(self.client.streamed(events), ("Hello from", "", "stop", None))
        self.assert_no_cli_left(self.p)

    def test_the_output_limit_ends_the_answer(self):
        self.assertEqual(self.ask("[[fake:max_tokens]]", max_tokens=5),
                         (200, (self.ANSWER, "", "length")))
        status, events = self.ask_stream("[[fake:max_tokens]]", max_tokens=5)
        self.assertEqual(self.client.streamed(events), (self.ANSWER, "", "length", None))
        self.assertEqual(self.runs()[-1]["env"]["CLAUDE_CODE_MAX_OUTPUT_TOKENS"], "5")

    def test_cli_errors_before_the_first_byte_are_http_errors(self):
        overloaded = 529 if self.client.path == "/v1/messages" else 503
        for prompt, status in (("[[fake:err529]]", overloaded), ("[[fake:ratelimit:60]]", 429),
                               ("[[fake:err401]]", 401), ("[[fake:exit:3]]", 502)):
            got, message = self.ask(prompt)
            self.assertEqual(got, status, (prompt, message))
            self.assertEqual(self.ask_stream(prompt)[0], status, prompt)
        self.assert_no_cli_left(self.p)

    def test_a_cli_that_dies_mid_answer_ends_the_stream_with_an_error(self):
        self.assertEqual(self.ask("[[fake:diemid]]")[0], 502)
        status, events = self.ask_stream("[[fake:diemid]]")
        text, _, finish, error = self.client.streamed(events)
        self.assertEqual((status, text, finish), (200, self.ANSWER, None))
        self.assertIn("without an answer", error)
        self.assert_no_cli_left(self.p)

    def test_a_retry_with_other_words_is_never_streamed_as_the_answer(self):
        prompt = "[[fake:words:12]][[fake:cut:5]][[fake:differ]]"
        with mock.patch.dict(os.environ, {"CLAUDE_CODE_MAX_RETRIES": "0"}):
            self.assertEqual(self.ask(prompt), (200, (OTHER_WORDS, "", "stop")))
            status, events = self.ask_stream(prompt)
        text, _, finish, error = self.client.streamed(events)
        self.assertEqual((status, text, finish), (200, "w0 w1 w2 w3 w4 ", None))
        self.assertIn("answered differently", error)

    def test_a_client_that_leaves_mid_stream_ends_the_cli(self):
        s = socket.create_connection(("127.0.0.1", self.p.port))
        data = json.dumps(self.client.body("[[fake:drip:0.02]]", stream=True)).encode()
        s.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (self.client.path.encode(), len(data), data))
        received = b""
        while b"Hello" not in received:
            chunk = s.recv(65536)
            self.assertTrue(chunk, "the stream ended before the first words")
            received += chunk
        s.close()
        self.assert_no_cli_left(self.p)

    WEATHER = [("get_weather", "The weather in a city.", {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
        ("get_time", "The time in a city.", {"type": "object", "properties": {
            "city": {"type": "string"}}})]
    PARIS = '[[fake:call:get_weather:{"city": "Paris"}]]'
    OSLO = '[[fake:call:get_time:{"city": "Oslo"}]]'

    def post(self, body):
        status, _, answer = self.p.request("POST", self.client.path, body)
        self.assertEqual(status, 200, answer)
        return answer

    def post_stream(self, body):
        conn = self.p.connect()
        try:
            conn.request("POST", self.client.path, body=json.dumps(dict(body, stream=True)),
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            self.assertEqual(response.status, 200)
            return self.client.parse_stream(response.read())
        finally:
            conn.close()

    def test_a_tool_call_round_trip(self):
        """The model calls a client function; the client runs it and asks again with the
        result, which the model then answers from."""
        body = self.client.with_tools(self.client.body("Weather in Paris? " + self.PARIS),
                                      self.WEATHER)
        answer = self.post(body)
        calls, finish = self.client.calls(answer)
        self.assertEqual([(name, args) for _, name, args in calls],
                         [("get_weather", {"city": "Paris"})])
        self.assertEqual(finish, "tool")
        run = self.only_run()
        self.assertEqual([t["name"] for t in run["mcp_tools"]],
                         ["mcp__proxy__get_time", "mcp__proxy__get_weather"])
        self.assertEqual(run["mcp_tools"][1]["input_schema"], self.WEATHER[0][2])
        self.assert_no_cli_left(self.p)
        follow_up = self.client.follow_up(body, answer, [(calls[0][0], "sunny, 21C")])
        self.assertEqual(self.client.answer(self.post(follow_up)),
                         ("Tools said: sunny, 21C", "", "stop"))
        run = self.runs()[-1]
        made = sent(run, "assistant", "tool_use")
        self.assertEqual([(b["name"], b["input"]) for b in made],
                         [("mcp__proxy__get_weather", {"city": "Paris"})],
                         "the call, a real tool_use under the name the model knows")
        self.assertEqual([b["tool_use_id"] for b in sent(run, "user", "tool_result")],
                         [made[0]["id"]], "the result, a real tool_result for that call")
        self.assertEqual(made[0]["id"], proxy.wire_tool_id(calls[0][0]))
        self.assert_no_cli_left(self.p)

    def test_parallel_calls_streamed_as_the_api_streams_them(self):
        body = self.client.with_tools(self.client.body(self.PARIS + self.OSLO), self.WEATHER)
        whole, finish = self.client.calls(self.post(body))
        events = self.post_stream(body)
        streamed, streamed_finish = self.client.streamed_calls(events)
        expected = [("get_weather", {"city": "Paris"}), ("get_time", {"city": "Oslo"})]
        self.assertEqual([(n, a) for _, n, a in whole], expected)
        self.assertEqual([(n, a) for _, n, a in streamed], expected)
        self.assertEqual((finish, streamed_finish), ("tool", "tool"))
        self.assertEqual(len({i for i, _, _ in streamed}), 2, "each call its own id")
        self.assert_no_cli_left(self.p)

    def test_the_answer_ends_with_the_models_turn(self):
        """The CLI is not waited for after the turn that called (it would deny the calls and
        ask the model again): the answer goes out and the CLI is ended."""
        body = self.client.with_tools(self.client.body(self.PARIS + "[[fake:stall]]"),
                                      self.WEATHER)
        calls, finish = self.client.calls(self.post(body))
        self.assertEqual((len(calls), finish), (1, "tool"))
        calls, finish = self.client.streamed_calls(self.post_stream(body))
        self.assertEqual((len(calls), finish), (1, "tool"))
        self.assert_no_cli_left(self.p)

    def test_tool_choice(self):
        body = self.client.body("hi " + self.PARIS)
        none = self.post(self.client.with_tools(dict(body), self.WEATHER, "none"))
        run = self.runs()[-1]
        self.assertNotIn("--mcp-config", run["argv"], "none: nothing is offered")
        self.assertEqual(self.client.calls(none), ([], "stop"))
        self.post(self.client.with_tools(dict(body), self.WEATHER, "required"))
        self.assertIn("must call at least one", self.runs()[-1]["system"])
        self.post(self.client.with_tools(dict(body), self.WEATHER, "get_time"))
        self.assertIn("must call the tool mcp__proxy__get_time", self.runs()[-1]["system"])
        self.post(self.client.with_tools(dict(body), self.WEATHER, "auto"))
        self.assertNotIn("must call", self.runs()[-1]["system"])

    def test_structured_output(self):
        schema = {"type": "object", "properties": {"name": {"type": "string"}},
                  "required": ["name"]}
        body = self.client.with_tools(self.client.body(
            'Who? [[fake:reply:Let me see.]][[fake:structured:{"name": "Ada"}]]'), [],
            schema=schema)
        del body["tools"]
        text, _, finish = self.client.answer(self.post(body))
        self.assertEqual((json.loads(text), finish), ({"name": "Ada"}, "stop"))
        run = self.runs()[-1]
        self.assertEqual(json.loads(run["argv"][run["argv"].index("--json-schema") + 1]),
                         schema)
        text, _, finish, error = self.client.streamed(self.post_stream(body))
        self.assertEqual((json.loads(text), finish, error), ({"name": "Ada"}, "stop", None))
        # The model wrote its JSON as text, not through the CLI's tool: that is the answer.
        for said in ('{"name": "Bo"}', '```json\n{"name": "Bo"}\n```'):
            body = self.client.with_tools(self.client.body("Who? [[fake:reply:%s]]" % said),
                                          [], schema=schema)
            del body["tools"]
            text, _, finish = self.client.answer(self.post(body))
            self.assertEqual((json.loads(text), finish), ({"name": "Bo"}, "stop"))
            text, _, finish, error = self.client.streamed(self.post_stream(body))
            self.assertEqual((json.loads(text), finish, error), ({"name": "Bo"}, "stop", None))
        for said in ("No JSON here.", '{"nom": "Bo"}'):  # not JSON, or not of the schema
            body = self.client.with_tools(self.client.body("Who? [[fake:reply:%s]]" % said),
                                          [], schema=schema)
            del body["tools"]
            status, _, answer = self.p.request("POST", self.client.path, body)
            self.assertEqual(status, 502, said)
            self.assertIn("requested JSON format", self.client.error(answer))
        self.assert_no_cli_left(self.p)

    def test_bad_bodies_are_400_in_the_dialects_shape(self):
        for body in ([], {"model": "opus"}, {"model": 7, "messages": []}):
            status, _, answer = self.p.request("POST", self.client.path, body)
            self.assertEqual(status, 400, body)
            self.assertTrue(self.client.error(answer))
        status, _, answer = self.p.request("POST", self.client.path, raw=b"{nope")
        self.assertEqual(status, 400)
        self.assertIn("not valid JSON", self.client.error(answer))
        self.assertEqual(self.runs(), [], "no CLI for a bad request")


    def test_a_wrong_type_in_any_field_is_a_400(self):
        """Every field the dialect reads, and a few it ignores, with values of every JSON type
        but its own: a 4xx in the dialect's shape each time, never a 500, and no CLI."""
        wrong = ([], {}, "x", 7, 1.5, True, [{"type": "text"}], {"type": 3})
        base = self.client.body("hi")
        fields = set(base) | set(self.client.FIELDS)
        answered = 0
        for field in sorted(fields):
            for value in wrong:
                body = dict(base, **{field: value})
                status, _, answer = self.p.request("POST", self.client.path, body)
                if status == 200:
                    answered += 1  # a value it may take (an ignored field, a string prompt)
                    continue
                self.assertTrue(400 <= status < 500, (field, value, status, answer))
                self.assertTrue(self.client.error(answer), (field, value))
        for field, value in self.client.NESTED:
            status, _, answer = self.p.request("POST", self.client.path,
                                               dict(base, **{field: value}))
            self.assertEqual(status, 400, (field, value, answer))
            self.assertTrue(self.client.error(answer), (field, value))
        self.assertEqual(len(self.runs()), answered, "a CLI ran for a refused request")


class ChatContractTest(DialectContract, unittest.TestCase):
    client = ChatClient()


class MessagesContractTest(DialectContract, unittest.TestCase):
    client = MessagesClient()


class ResponsesContractTest(DialectContract, unittest.TestCase):
    client = ResponsesClient()


class MessagesDialectTest(FakeClaudeMixin, unittest.TestCase):
    """POST /v1/messages beyond the contract: what reaches the CLI, what is refused."""

    def setUp(self):
        super().setUp()
        self.p = self.start_proxy()

    def post(self, body, path="/v1/messages", headers=None):
        return self.p.request("POST", path, body, headers=headers)

    def test_system_images_and_documents_reach_the_cli(self):
        pdf = "JVBERi0xLjQK"  # "%PDF-1.4\n"
        status, _, body = self.post({"model": "claude-opus-5-5", "max_tokens": 50, "system": [
            {"type": "text", "text": "Be terse.", "cache_control": {"type": "ephemeral"}}],
            "messages": [
                {"role": "user", "content": "earlier"},
                {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm",
                                                   "signature": "x"},
                                                  {"type": "text", "text": "an answer"}]},
                {"role": "user", "content": [
                    {"type": "text", "text": "look", "cache_control": {"type": "ephemeral"}},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                 "data": PNG_1PX}},
                    {"type": "document", "source": {"type": "base64",
                                                    "media_type": "application/pdf",
                                                    "data": pdf}}]},
                {"role": "system", "content": "Also be kind."}]})
        self.assertEqual(status, 200, body)
        run = self.only_run()
        self.assertEqual(run["system"], "Be terse.\n\nAlso be kind.")
        content = sent(run)
        self.assertIn({"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                   "data": PNG_1PX}}, content)
        self.assertIn({"type": "document", "source": {"type": "base64",
                                                      "media_type": "application/pdf",
                                                      "data": pdf}}, content)
        text = json.dumps(content)
        self.assertIn({"type": "text", "text": "an answer"}, sent(run, "assistant"))
        self.assertNotIn("hmm", text, "earlier thinking is not part of the transcript")
        self.assertNotIn("cache_control", text, "the CLI places its own cache breakpoints")

    def test_what_is_not_supported_is_a_400_naming_it(self):
        def user(content):
            return {"model": "opus", "max_tokens": 5, "messages": [{"role": "user",
                                                                  "content": content}]}
        cases = [
            (dict(user("hi"), tools=[{"name": "x y", "input_schema": {}}]), "x y"),
            (dict(user("hi"), tools=[{"name": "x", "input_schema": {"type": "string"}}]),
             "input_schema"),
            (dict(user("hi"), tools=[{"type": "telepathy", "name": "x"}]), "telepathy"),
            (dict(user("hi"), tools=[{"name": "x"}], tool_choice={"type": "tool", "name": "y"}),
             "tool_choice"),
            (dict(user("hi"), tool_choice={"type": "sometimes"}), "tool_choice"),
            (dict(user("hi"), mcp_servers=[{"type": "url", "url": "https://x"}]), "mcp_servers"),
            (user([{"type": "tool_result", "tool_use_id": "t", "content": "x"}]), "answers no"),
            (user([{"type": "tool_use", "id": 5, "name": "x"}]), "tool_use"),
            ({"model": "opus", "max_tokens": 5, "messages": [
                {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure"}]},
             "prefill"),
            (user([{"type": "image", "source": {"type": "base64", "media_type": "image/bmp",
                                                "data": "AAAA"}}]), "image/bmp"),
            (user([{"type": "image", "source": {"type": "url", "url": "http://x/a.png"}}]),
             "https"),
            (dict(user("hi"), temperature=1.5), "temperature"),
            (dict(user("hi"), stop_sequences=[""]), "stop_sequences"),
            (dict(user("hi"), thinking={"type": "enabled"}), "thinking"),
            (dict(user("hi"), output_config={"effort": "extreme"}), "effort"),
            (dict(user("hi"), max_tokens=0), "max_tokens"),
            ({"model": "opus", "messages": [{"role": "tool", "content": "x"}]}, "role"),
        ]
        for body, said in cases:
            status, _, answer = self.post(body)
            self.assertEqual(status, 400, body)
            self.assertEqual(answer["type"], "error")
            self.assertEqual(answer["error"]["type"], "invalid_request_error")
            self.assertIn(said, answer["error"]["message"], body)
        self.assertEqual(self.runs(), [])

    def test_effort_comes_from_output_config_or_the_thinking_budget(self):
        for extra, effort in [({"output_config": {"effort": "xhigh"}}, "xhigh"),
                              ({"thinking": {"type": "enabled", "budget_tokens": 10000}}, "high"),
                              ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "low"),
                              ({"thinking": {"type": "disabled"}}, "low"),
                              ({"thinking": {"type": "adaptive"}}, None), ({}, None)]:
            body = dict({"model": "opus", "max_tokens": 5, "messages": [
                {"role": "user", "content": "hi"}]}, **extra)
            self.assertEqual(self.post(body)[0], 200)
            argv = self.runs()[-1]["argv"]
            self.assertEqual(argv[argv.index("--effort") + 1] if "--effort" in argv else None,
                             effort, extra)

    def test_the_stop_sequence_that_matched_is_named(self):
        status, _, body = self.post({"model": "opus", "max_tokens": 50, "stop_sequences": [
            "zzz", " fake"], "messages": [{"role": "user", "content": "hi"}]})
        self.assertEqual((body["stop_reason"], body["stop_sequence"]), ("stop_sequence", " fake"))
        self.assertEqual(body["content"], [{"type": "text", "text": "Hello from the"}])

    def test_count_tokens_is_an_estimate_and_models_come_in_anthropic_shape(self):
        status, _, body = self.post({"model": "opus", "messages": [
            {"role": "user", "content": "x" * 400}]}, path="/v1/messages/count_tokens")
        self.assertEqual((status, body), (200, {"input_tokens": 100}))
        status, _, body = self.post({"model": "opus", "tools": [
            {"name": "t", "input_schema": {"type": "object"}}], "messages": [
            {"role": "user", "content": "x" * 400},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "c", "name": "t",
                                               "input": {"q": "y" * 400}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c",
                                          "content": "z" * 400}]}]},
            path="/v1/messages/count_tokens")
        self.assertEqual(status, 200, body)
        self.assertGreater(body["input_tokens"], 300, "calls, results and tools count too")
        self.assertEqual(self.runs(), [], "counting starts no CLI")
        status, _, body = self.p.request("GET", "/v1/models",
                                         headers={"anthropic-version": "2023-06-01"})
        self.assertEqual(body["data"][0]["type"], "model")
        self.assertIn("has_more", body)
        status, _, body = self.p.request("GET", "/v1/models/claude-opus-5-5",
                                         headers={"anthropic-version": "2023-06-01"})
        self.assertEqual((body["type"], body["id"]), ("model", "claude-opus-5-5"))
        self.assertEqual(self.p.request("GET", "/v1/models")[2]["object"], "list")

    def test_the_proxys_own_errors_come_in_anthropic_shape(self):
        p = self.start_proxy(api_keys=["k1"])
        hello = {"model": "opus", "max_tokens": 5, "messages": [{"role": "user",
                                                                 "content": "hi"}]}
        status, _, body = p.request("POST", "/v1/messages", hello)
        self.assertEqual((status, body["error"]["type"]), (401, "authentication_error"))
        status, _, body = p.request("POST", "/v1/messages", hello, headers={
            "x-api-key": "k1", "anthropic-version": "2023-06-01",
            "anthropic-beta": "interleaved-thinking-2025-05-14"})
        self.assertEqual(status, 200, body)
        status, _, body = p.request("GET", "/v1/messages", headers={"x-api-key": "k1"})
        self.assertEqual((status, body["type"]), (405, "error"))

    def test_a_request_as_claude_code_sends_it(self):
        """The keys and shapes Claude Code 2.1.331 sends (EndToEndTest runs the real one)."""
        body = {"model": "claude-opus-5-5", "max_tokens": 32000, "stream": True,
                "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=1"},
                           {"type": "text", "text": "You are Claude Code.",
                            "cache_control": {"type": "ephemeral"}}],
                "messages": [{"role": "user", "content": [
                    {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]},
                    {"role": "system", "content": [{"type": "text", "text": "# Environment"}]}],
                "thinking": {"type": "adaptive", "display": "updates"},
                "output_config": {"effort": "medium"}, "metadata": {"user_id": "{}"},
                "context_management": {"edits": []}, "tools": []}
        conn = self.p.connect()
        conn.request("POST", "/v1/messages?beta=true", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        self.assertEqual(response.status, 200)
        events = parse_named_sse(response.read())
        conn.close()
        self.assertEqual(MessagesClient().streamed(events)[0], "Hello from the fake API.")
        argv = self.only_run()["argv"]
        self.assertEqual(argv[argv.index("--model") + 1], "claude-opus-5-5")
        self.assertEqual(argv[argv.index("--effort") + 1], "medium")


class ResponsesDialectTest(FakeClaudeMixin, unittest.TestCase):
    """POST /v1/responses beyond the contract: conversations, Codex's input, what is refused."""

    def setUp(self):
        super().setUp()
        self.p = self.start_proxy()

    def post(self, **body):
        body.setdefault("model", "sonnet")
        return self.p.request("POST", "/v1/responses", body)

    def test_previous_response_id_continues_the_conversation(self):
        status, _, first = self.post(input="My name is Ada.", instructions="Be brief.")
        self.assertEqual(status, 200, first)
        status, _, second = self.post(input="What is my name?",
                                      previous_response_id=first["id"])
        self.assertEqual((status, second["previous_response_id"]), (200, first["id"]))
        run = self.runs()[-1]
        self.assertEqual([m["role"] for m in run["messages"]],
                         ["user", "system", "assistant", "user"])
        self.assertIn({"type": "text", "text": "My name is Ada."}, sent(run, "user"))
        self.assertEqual(sent(run, "assistant"), [{"type": "text",
                                                   "text": "Hello from the fake API."}],
                         "the earlier answer is the model's own turn")
        self.assertIsNone(self.runs()[-1]["system"], "instructions are not carried over")
        status, _, body = self.post(input="x", previous_response_id="resp_nope")
        self.assertEqual((status, body["error"]["code"]), (404, "previous_response_not_found"))
        status, _, unstored = self.post(input="forget me", store=False)
        self.assertEqual(unstored["store"], False)
        status, _, _ = self.post(input="x", previous_response_id=unstored["id"])
        self.assertEqual(status, 404, "store: false keeps nothing")

    def test_codex_style_input_is_accepted(self):
        status, _, body = self.post(
            instructions="You are Codex.", store=False, stream=False,
            include=["reasoning.encrypted_content"], reasoning={"effort": "minimal",
                                                                "summary": "auto"},
            parallel_tool_calls=False, prompt_cache_key="abc", tool_choice="auto", tools=[],
            input=[{"type": "message", "role": "developer", "content": [
                {"type": "input_text", "text": "Follow AGENTS.md."}]},
                {"type": "message", "role": "user", "content": [
                    {"type": "input_text", "text": "first question"}]},
                {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAA"},
                {"type": "message", "role": "assistant", "content": [
                    {"type": "output_text", "text": "first answer"}]},
                {"role": "user", "content": [
                    {"type": "input_text", "text": "second"},
                    {"type": "input_image", "image_url": "data:image/png;base64," + PNG_1PX}]}])
        self.assertEqual(status, 200, body)
        run = self.only_run()
        self.assertEqual(run["system"], "You are Codex.\n\nFollow AGENTS.md.")
        self.assertEqual(run["argv"][run["argv"].index("--effort") + 1], "low")
        prompt = json.dumps(run["messages"])
        self.assertIn({"type": "text", "text": "first answer"}, sent(run, "assistant"))
        self.assertIn(PNG_1PX, prompt)
        self.assertEqual(body["reasoning"], {"effort": "minimal", "summary": "auto"})

    def test_a_request_as_codex_sends_it(self):
        """The keys and item kinds Codex 0.169 sends (captured from the real one, texts cut)."""
        body = {
            "model": "claude-sonnet-4", "stream": True, "tool_choice": "auto",
            "parallel_tool_calls": True, "reasoning": {"summary": "auto"}, "store": False,
            "include": ["reasoning.encrypted_content"], "prompt_cache_key": "01a2-key",
            "client_metadata": {"x-codex-window-id": "01a2:0", "session_id": "01a2"},
            "input": [
                {"type": "message", "role": "developer", "content": [
                    {"type": "input_text", "text": "<permissions instructions>read-only"}]},
                {"type": "message", "role": "developer", "content": [
                    {"type": "input_text", "text": "You are Codex."},
                    {"type": "input_text", "text": "<collaboration_mode>default"}]},
                {"type": "message", "role": "user", "content": [
                    {"type": "input_text", "text": "<environment_context>cwd"}]},
                {"type": "message", "role": "user", "content": [
                    {"type": "input_text", "text": "say hi"}]}],
            "tools": [{"type": "function", "name": "exec_command", "strict": False,
                       "parameters": {"type": "object", "properties": {}}},
                      {"type": "web_search"}]}
        body["tools"].insert(1, {"type": "namespace", "name": "multi_agent_v1",
                                 "description": "Agents", "tools": [
                                     {"type": "function", "name": "spawn_agent",
                                      "parameters": {"type": "object", "properties": {}}}]})
        status, response, events = self.p.request("POST", "/v1/responses", body)
        self.assertEqual(status, 200)
        run = self.only_run()
        self.assertEqual(run["system"].split("\n\n")[:2], [
            "<permissions instructions>read-only", "You are Codex.<collaboration_mode>default"])
        self.assertIn("say hi", json.dumps(run["stdin"]))
        self.assertEqual([t["name"] for t in run["mcp_tools"]], [
            "mcp__proxy__exec_command", "mcp__proxy__multi_agent_v1__spawn_agent"],
            "functions offered, web_search left out")
        self.assertIn("(multi_agent_v1: Agents)", run["mcp_tools"][1]["description"])

    def test_custom_and_namespaced_tools(self):
        """A freeform tool comes back as a custom_tool_call with its string input; a function
        of a namespace as a function_call with its name and namespace."""
        tools = [{"type": "custom", "name": "apply_patch", "description": "Apply a patch.",
                  "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}},
                 {"type": "namespace", "name": "agents_v1", "description": "Agents",
                  "tools": [{"type": "function", "name": "spawn", "parameters": {
                      "type": "object", "properties": {"task": {"type": "string"}}}}]}]
        prompt = ('[[fake:call:apply_patch:{"input": "*** Begin Patch"}]]'
                  '[[fake:call:agents_v1__spawn:{"task": "tests"}]]')
        status, _, body = self.post(input=prompt, tools=tools)
        self.assertEqual(status, 200, body)
        custom, spawn = body["output"]
        self.assertEqual((custom["type"], custom["name"], custom["input"]),
                         ("custom_tool_call", "apply_patch", "*** Begin Patch"))
        self.assertTrue(custom["id"].startswith("ctc_"))
        self.assertEqual((spawn["type"], spawn["name"], spawn["namespace"],
                          json.loads(spawn["arguments"])),
                         ("function_call", "spawn", "agents_v1", {"task": "tests"}))
        run = self.only_run()
        offered = {t["name"]: t for t in run["mcp_tools"]}
        self.assertEqual(offered["mcp__proxy__apply_patch"]["input_schema"],
                         proxy.CUSTOM_TOOL_SCHEMA)
        self.assertIn("start: /.+/", offered["mcp__proxy__apply_patch"]["description"])
        status, _, raw = self.p.request("POST", "/v1/responses", dict(
            model="sonnet", input=prompt, tools=tools, stream=True))
        events = parse_named_sse(raw)
        names = [name for name, _ in events]
        self.assertIn("response.custom_tool_call_input.done", names)
        done = [e for name, e in events if name == "response.custom_tool_call_input.done"]
        self.assertEqual(done[0]["input"], "*** Begin Patch")
        # The results go back by call_id: freeform and namespaced alike.
        status, _, follow = self.post(tools=tools, store=False, input=[
            {"role": "user", "content": prompt},
            dict(custom, status="completed"), spawn,
            {"type": "custom_tool_call_output", "call_id": custom["call_id"], "output": "ok"},
            {"type": "function_call_output", "call_id": spawn["call_id"], "output": [
                {"type": "input_text", "text": "spawned"}]}])
        self.assertEqual((status, follow["output"][0]["content"][0]["text"]),
                         (200, "Tools said: spawned"))
        run = self.runs()[-1]
        self.assertEqual([b["name"] for b in sent(run, "assistant", "tool_use")],
                         ["mcp__proxy__apply_patch", "mcp__proxy__agents_v1__spawn"])
        self.assertIn("*** Begin Patch", json.dumps(sent(run, "assistant", "tool_use")))

    def test_a_history_as_codex_resends_it(self):
        """store: false, so Codex sends every item again: reasoning, calls, their outputs."""
        status, _, body = self.post(store=False, tools=[{
            "type": "function", "name": "exec_command", "parameters": {"type": "object"}}],
            input=[{"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "run ls"}]},
                {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "x"},
                {"type": "function_call", "id": "fc_1", "call_id": "call_1",
                 "name": "exec_command", "arguments": '{"cmd": "ls"}'},
                {"type": "function_call_output", "call_id": "call_1", "output": "a.txt"},
                {"type": "message", "role": "assistant", "content": [
                    {"type": "output_text", "text": "There is a.txt."}]},
                {"type": "message", "role": "user", "content": [
                    {"type": "input_text", "text": "thanks"}]}])
        self.assertEqual(status, 200, body)
        prompt = self.only_run()["stdin"][0]["message"]["content"]
        self.assertIn('<tool_call id="call_1" name="mcp__proxy__exec_command">', prompt)
        self.assertIn('<tool_result tool_call_id="call_1">\na.txt', prompt)
        self.assertTrue(prompt.endswith("thanks"))

    def test_what_is_not_supported_is_a_400_naming_it(self):
        cases = [
            ({"input": [{"type": "function_call", "call_id": "c", "name": "f",
                         "arguments": "{}"}]}, "input"),
            ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]},
             "answers no"),
            ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"},
                        {"role": "user", "content": "x"}]}, "call_id"),
            ({"input": "hi", "tools": [{"type": "function", "name": "a b"}]}, "tools[0].name"),
            ({"input": "hi", "tools": [{"type": "telepathy"}]}, "telepathy"),
            ({"input": "hi", "tools": [{"type": "namespace", "name": "n", "tools": [
                {"type": "namespace", "name": "m", "tools": []}]}]}, "namespace"),
            ({"input": "hi", "tools": [{"type": "function", "name": "f"}],
              "tool_choice": {"type": "function", "name": "g"}}, "tool_choice"),
            ({"input": "hi", "text": {"format": {"type": "json_schema"}}}, "text.format"),
            ({"input": [{"role": "user", "content": [{"type": "input_file",
                                                      "file_id": "f"}]}]}, "input_file"),
            ({"input": [{"type": "item_reference", "id": "x"}]}, "item_reference"),
            ({"input": []}, "input"), ({"input": "hi", "background": True}, "background"),
            ({"input": "hi", "reasoning": {"effort": "extreme"}}, "reasoning.effort"),
        ]
        for body, said in cases:
            status, _, answer = self.post(**body)
            self.assertEqual(status, 400, body)
            self.assertIn(said, answer["error"]["message"] + (answer["error"]["param"] or ""),
                          body)
        self.assertEqual(self.runs(), [])

    def test_the_output_limit_makes_an_incomplete_response(self):
        status, _, body = self.post(input="[[fake:max_tokens]]", max_output_tokens=20)
        self.assertEqual((body["status"], body["incomplete_details"]),
                         ("incomplete", {"reason": "max_output_tokens"}))
        self.assertEqual(body["usage"]["output_tokens"], 9)

    def test_a_revision_replaces_the_collected_output(self):
        answer = proxy.ResponsesAnswer(proxy.parse_responses_request(
            {"model": "opus", "input": "hi"}, proxy.ResponseStore(1, 1000)), "resp_x", False,
            proxy.ResponseStore(1, 1000))
        for event in (proxy.Start("m"), proxy.Text("w0 "), proxy.Revised(
                (("thinking", "new plan"), ("text", "v0 v1"))), proxy.Finish("end_turn", {})):
            answer.feed(event)
        body = answer.body()
        self.assertEqual([i["type"] for i in body["output"]], ["reasoning", "message"])
        self.assertEqual(ResponsesClient().answer(body), ("v0 v1", "new plan", "stop"))

    def test_the_store_is_bounded(self):
        store = proxy.ResponseStore(items=2, size=10 ** 6)
        for name in "abc":
            store.put(name, [("user", [{"type": "text", "text": name}])])
        self.assertEqual([store.get(n) is not None for n in "abc"], [False, True, True])
        store = proxy.ResponseStore(items=100, size=200)
        store.put("big", [("user", [{"type": "text", "text": "x" * 150}])])
        store.put("next", [("user", [{"type": "text", "text": "y" * 150}])])
        self.assertEqual((store.get("big"), store.get("next") is not None), (None, True))
        store.put("huge", [("user", [{"type": "text", "text": "z" * 500}])])
        self.assertIsNone(store.get("huge"), "one larger than the cap is not kept")


class DisconnectTest(FakeClaudeMixin, unittest.TestCase):
    """A client that goes away gets its CLI process group ended, in both modes."""

    def hang_up_after(self, p, body, read_first=False):
        s = send_chat(p.port, body)
        run = wait_until(lambda: self.runs(), what="the CLI to start")[0]
        received = b""
        while read_first and b"data: " not in received:
            received += s.recv(65536)
        self.assertTrue(alive(run["pid"]))
        s.close()
        return run

    def test_non_streaming_client_leaves(self):
        p = self.start_proxy()
        run = self.hang_up_after(p, {"model": "opus", "messages": [
            {"role": "user", "content": "[[fake:silent]][[fake:child]]"}]})
        self.assert_no_cli_left(p, [run])

    def test_streaming_client_leaves_mid_stream(self):
        p = self.start_proxy()
        run = self.hang_up_after(p, {"model": "opus", "stream": True, "messages": [
            {"role": "user", "content": "[[fake:drip:0.02]][[fake:child]]"}]}, read_first=True)
        self.assert_no_cli_left(p, [run])

    def test_streaming_client_leaves_before_the_first_token(self):
        p = self.start_proxy()
        run = self.hang_up_after(p, {"model": "opus", "stream": True, "messages": [
            {"role": "user", "content": "[[fake:silent]]"}]})
        self.assert_no_cli_left(p, [run])
        status, _, _ = p.request("GET", "/health")
        self.assertEqual(status, 200)

    def test_shutdown_ends_every_cli(self):
        p = Proxy(claude_bin=self.fake_path)
        sockets = [send_chat(p.port, {"model": "opus", "messages": [
            {"role": "user", "content": "[[fake:silent]][[fake:child]]"}]}) for _ in range(3)]
        runs = wait_until(lambda: len(self.runs()) == 3 and self.runs(), what="3 CLIs")
        p.close()
        self.assert_no_cli_left(p, runs)
        for s in sockets:
            s.close()


    def test_client_that_leaves_while_waiting_frees_its_place(self):
        p = self.start_proxy(max_concurrency=1)
        held = send_chat(p.port, chat_body("[[fake:gate:held]]"))
        wait_until(lambda: self.runs(), what="the first CLI")
        for stream in (False, True):
            waiting = send_chat(p.port, chat_body("left", stream=stream))
            wait_until(lambda: p.server.slots.queued == 1, what="a request to wait")
            waiting.close()
            wait_until(lambda: p.server.slots.queued == 0, what="its place to be freed")
        open(os.path.join(self.log_dir, "held"), "w").close()
        self.assertEqual(read_response(held)[0], 200)
        self.assertEqual(len(self.runs()), 1, "no CLI for the clients that left")
        self.assertEqual(p.chat()[0], 200)
        self.assert_no_cli_left(p)

    def test_client_that_leaves_while_sending_its_body(self):
        p = self.start_proxy()
        with socket.create_connection(("127.0.0.1", p.port)) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                      b"application/json\r\nContent-Length: 1000\r\n\r\n{\"model\"")
            wait_until(lambda: p.server.connections == 1, what="the connection")
        wait_until(lambda: p.server.connections == 0, what="the server to let it go")
        self.assertEqual(self.runs(), [])
        self.assertEqual(p.chat()[0], 200)


class ConversationTest(FakeClaudeMixin, unittest.TestCase):
    """Requests with history resume a session prepared for them (Sessions): what the fake
    CLI (which reads session files as 2.1.331 does) gets, and that nothing stays behind."""

    def setUp(self):
        super().setUp()
        # The shared directory (working directory and learnt preambles) starts empty, as on a
        # machine the daemon never ran on.
        self.own_temp_dir("proxy-conv-")

    def ask(self, p, messages, **fields):
        status, _, body = p.request("POST", "/v1/chat/completions", dict(
            {"model": "sonnet", "messages": messages}, **fields))
        self.assertEqual(status, 200, body)
        return body["choices"][0]["message"]

    def converse(self, p, turns, first="Hello there."):
        """`turns` exchanges; returns the messages sent and the runs' records."""
        messages = [{"role": "user", "content": first}]
        records = []
        for n in range(turns):
            answer = self.ask(p, messages)
            records.append(self.runs()[-1])
            messages += [{"role": "assistant", "content": answer["content"]},
                         {"role": "user", "content": "Turn %d." % (n + 2)}]
        return messages, records

    def assert_repeats(self, records):
        for before, after in zip(records, records[1:]):
            self.assertEqual(after["messages"][:len(before["messages"])], before["messages"])
            self.assertGreater(len(after["messages"]), len(before["messages"]))

    def test_a_conversation_resumes_its_session_turn_after_turn(self):
        p = self.start_proxy()
        _, records = self.converse(p, 4)
        first = records[0]["argv"]
        self.assertIn("--session-id", first, "a first run persists its session to learn from")
        self.assertNotIn("--no-session-persistence", first)
        for n, record in enumerate(records[1:], 2):
            argv = record["argv"]
            self.assertIn("--no-session-persistence", argv, "the prepared file stays as it is")
            self.assertEqual(argv[argv.index("--resume") + 1] + ".jsonl",
                             os.path.basename(record["session"]["path"]))
            self.assertEqual(record["session"]["mode"], 0o600)
            self.assertEqual(record["session"]["dir_mode"], 0o700)
            self.assertEqual(record["stdin"], [{"type": "user", "message": {
                "role": "user", "content": "Turn %d." % n}}])
            self.assertEqual([m["role"] for m in record["messages"]],
                             ["user", "system"] + ["assistant", "user"] * (n - 1))
            self.assertEqual(sent(record, "assistant"), text("Hello from the fake API.") *
                             (n - 1), "the answers are the model's own turns")
        self.assert_repeats(records)
        self.assert_no_cli_left(p)
        self.assertEqual(session_files(p=p), [], "no session file stays")
        self.assertFalse(os.path.exists(os.path.join(self.home, ".claude", "projects")))
        self.assertEqual(os.listdir(p.server.workdir), ["pid"], "no marker stays")
        health = p.request("GET", "/health")[2]
        self.assertEqual(health["history"], "turns")

    def test_a_turn_of_tool_results_is_resumed_by_the_cli(self):
        p = self.start_proxy()
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}}}}]
        messages = [{"role": "user", "content": 'Oslo? [[fake:call:get_weather:{"city": '
                                                '"Oslo"}]]'}]
        answer = self.ask(p, messages, tools=tools)
        call = answer["tool_calls"][0]
        messages += [answer, {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}]
        answer = self.ask(p, messages, tools=tools)
        self.assertEqual(answer["content"], "Tools said: sunny")
        record = self.runs()[-1]
        self.assertEqual(record["stdin"], [], "tool results cannot go on stdin")
        self.assertEqual(record["env"]["CLAUDE_CODE_RESUME_INTERRUPTED_TURN"], "1")
        self.assertEqual(record["session"]["rows"][-1]["message"]["content"], [{
            "type": "tool_result", "tool_use_id": call["id"], "content": text("sunny")}])
        messages += [answer, {"role": "user", "content": "Thanks."}]
        self.ask(p, messages, tools=tools)
        later = self.runs()[-1]
        self.assertIsNone(later["env"]["CLAUDE_CODE_RESUME_INTERRUPTED_TURN"])
        self.assert_repeats([record, later])
        self.assertEqual(session_files(p=p), [])

    def test_a_first_turn_of_several_user_messages_is_one_message_not_a_transcript(self):
        """Codex opens with its environment notes and the prompt as two user messages."""
        p = self.start_proxy()
        messages = [{"role": "user", "content": "<environment_context>x</environment_context>"},
                    {"role": "user", "content": "Fix the bug."}]
        answer = self.ask(p, messages)
        first = self.runs()[-1]
        self.assertEqual(first["stdin"][0]["message"]["content"],
                         "<environment_context>x</environment_context>\nFix the bug.")
        self.ask(p, messages + [answer, {"role": "user", "content": "Thanks."}])
        self.assert_repeats([first, self.runs()[-1]])

    def test_a_restarted_daemon_goes_on_with_the_same_prefix(self):
        p = self.start_proxy()
        messages, records = self.converse(p, 2)
        p.close()
        again = self.start_proxy()
        self.ask(again, messages)
        record = self.runs()[-1]
        self.assertIn("--resume", record["argv"], "the preamble was kept: no run to learn it")
        self.assert_repeats(records + [record])

    def test_edited_and_regenerated_histories_start_their_own_prefix(self):
        p = self.start_proxy()
        messages, records = self.converse(p, 3)
        self.ask(p, messages[:-2])  # the last answer again
        regenerated = self.runs()[-1]
        self.assertEqual(regenerated["messages"], records[-1]["messages"])
        edited = [dict(messages[0], content="Hello, edited.")] + messages[1:]
        self.ask(p, edited)
        record = self.runs()[-1]
        self.assertIn("Hello, edited.", json.dumps(record["messages"]))
        self.assertNotIn("Hello there.", json.dumps(record["messages"]))
        self.assertEqual(session_files(p=p), [])

    def test_a_session_folder_removed_by_another_run_as_it_is_made_is_made_again(self):
        """Its parent went with another run's end just as this one began (FileNotFoundError),
        or the folder did, between makedirs' mkdir finding it there and its check that it is a
        folder (FileExistsError: seen in a run of the suite)."""
        p = self.start_proxy()
        messages, _ = self.converse(p, 1)  # the preamble, learnt
        real = os.makedirs
        for error in (FileNotFoundError(2, "No such file or directory"),
                      FileExistsError(17, "File exists")):
            raced = []

            def makedirs(path, *args, **kwargs):
                if not raced:
                    raced.append(path)
                    raise error
                return real(path, *args, **kwargs)

            with mock.patch.object(proxy.os, "makedirs", makedirs):
                self.ask(p, messages)
            self.assertEqual(len(raced), 1)
            self.assertIsNotNone(self.runs()[-1]["session"], "resumed all the same")

    def test_conversations_in_parallel_never_mix(self):
        p = self.start_proxy(max_concurrency=4)
        self.ask(p, [{"role": "user", "content": "warm up"}])  # learns the preamble

        def talk(name):
            messages = [{"role": "user", "content": "I am %s. [[fake:slow:0.01]]" % name}]
            for n in range(3):
                answer = self.ask(p, messages)
                messages += [answer, {"role": "user", "content": "%s again %d" % (name, n)}]

        self.assertEqual(in_parallel(talk, ("Ada", "Bob")), [])
        resumed = [r for r in self.runs() if "--resume" in r["argv"]]
        self.assertEqual(len(resumed), 4, "the second and third turns of each")
        for record in resumed:
            said = json.dumps(record["messages"])
            self.assertNotEqual("Ada" in said, "Bob" in said, said)
        self.assertEqual(len({r["session"]["path"] for r in resumed}), 4, "a file per run")
        self.assertEqual(session_files(p=p), [])

    def test_a_cli_that_refuses_the_session_gets_the_transcript_said_once(self):
        p = self.start_proxy()
        messages, _ = self.converse(p, 1)
        with mock.patch.dict(os.environ, {"FAKE_CLAUDE_NO_SESSIONS": "1"}), \
                self.assertLogs("claude_max_proxy", "WARNING") as logs:
            answer = self.ask(p, messages)
            refused, transcript = self.runs()[-2:]
            messages += [answer, {"role": "user", "content": "Again."}]
            self.assertEqual(self.ask(p, messages)["content"], "Hello from the fake API.")
        self.assertEqual(answer["content"], "Hello from the fake API.")
        self.assertIn("--resume", refused["argv"])
        self.assertNotIn("--resume", transcript["argv"])
        self.assertTrue(transcript["stdin"][0]["message"]["content"].startswith(
            proxy.TRANSCRIPT_HEAD))
        self.assertTrue(refused["refused"])
        self.assertNotIn("--resume", self.runs()[-1]["argv"], "not tried again")
        said = [r for r in logs.output if "did not take the session" in r]
        self.assertEqual(len(said), 1, logs.output)
        self.assertIn("No conversation found", said[0])
        self.assertEqual(p.request("GET", "/health")[2]["history"], "transcript")
        self.assertEqual(session_files(p=p), [])

    def test_history_transcript_keeps_the_old_way(self):
        p = self.start_proxy(history="transcript")
        _, records = self.converse(p, 2)
        for record in records:
            self.assertNotIn("--resume", record["argv"])
            self.assertNotIn("--session-id", record["argv"])
        self.assertTrue(records[-1]["stdin"][0]["message"]["content"].startswith(
            proxy.TRANSCRIPT_HEAD))
        self.assertEqual(p.request("GET", "/health")[2]["history"], "transcript")
        with mock.patch.dict(os.environ, {"CLAUDE_MAX_API_HISTORY": "transcript"}):
            self.assertEqual(proxy.parse_args([]).history, "transcript")
        with mock.patch.dict(os.environ, {"CLAUDE_MAX_API_HISTORY": "sometimes"}), \
                self.assertRaises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
            proxy.parse_args([])

    def test_what_a_killed_daemon_left_in_the_projects_directory_is_swept(self):
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        dead = os.path.join(self.tmp_root, "claude-max-proxy-dead")
        os.mkdir(dead)
        with open(os.path.join(dead, "pid"), "w") as f:
            f.write(str(gone.pid))
        projects = os.path.join(self.home, ".claude", "projects", "-somewhere")
        os.makedirs(projects)
        left = os.path.join(projects, str(proxy.uuid.uuid4()) + ".jsonl")
        keep = os.path.join(projects, "notes.txt")
        for path in (left, keep):
            with open(path, "w") as f:
                f.write("{}\n")
        os.mkdir(left[:-6])  # what the CLI keeps beside a session, by its name
        for n, path in enumerate((left, keep)):
            with open(os.path.join(dead, "session-%d" % n), "w") as f:
                f.write(path + "\n")
        self.start_proxy()
        self.assertFalse(os.path.exists(dead))
        self.assertFalse(os.path.exists(left) or os.path.exists(left[:-6]))
        self.assertTrue(os.path.exists(keep), "only a session file's name is trusted")


def normalized(value):
    """A response body without what differs between any two runs: ids and timestamps."""
    if isinstance(value, dict):
        return {k: normalized(v) for k, v in value.items()
                if k not in ("id", "created", "created_at", "call_id", "system_fingerprint")}
    if isinstance(value, list):
        return [normalized(v) for v in value]
    return value


def what_the_cli_got(record):
    """A fake CLI record without what differs between any two runs (file and session names),
    and without the flags of what a waiting CLI takes on stdin: the model and system prompt
    that it answers with are compared instead."""
    argv = list(record["argv"])
    for flag in ("--model", "--append-system-prompt-file"):
        if flag in argv:
            del argv[argv.index(flag):argv.index(flag) + 2]
    argv = [re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}",
                   "<id>", a) for a in argv]
    argv = [re.sub(r"/[^\"\s]*/(system|tools)-<id>\.txt", r"<\1>", a) for a in argv]
    return {"argv": argv, "model": record["model"], "system": record["system"],
            "messages": record["messages"], "stdin": record["stdin"], "env": record["env"]}


DIALECT_PATHS = {"chat": "/v1/chat/completions", "messages": "/v1/messages",
                 "responses": "/v1/responses"}


def dialect_body(dialect, say, model="sonnet", system=None, history=(), tools=False):
    """A request in `dialect`: `history` (user and assistant messages of text) then `say`."""
    history = list(history) + [{"role": "user", "content": say}]
    if dialect == "chat":
        body = {"model": model, "messages": ([{"role": "system", "content": system}]
                                             if system else []) + history}
    elif dialect == "messages":
        body = dict({"model": model, "max_tokens": 1024, "messages": history},
                    **({"system": system} if system else {}))
    else:
        body = dict({"model": model, "input": history},
                    **({"instructions": system} if system else {}))
    if tools:
        body["tools"] = TOOLS_BY_DIALECT[dialect]
    return body


def answer_text(dialect, answer):
    if dialect == "chat":
        return answer["choices"][0]["message"]["content"]
    if dialect == "messages":
        return "".join(b["text"] for b in answer["content"] if b["type"] == "text")
    return "".join(part["text"] for item in answer["output"] if item["type"] == "message"
                   for part in item["content"])


def warm_or_cold(test, cold, warm, dialect, steps, observe, settle):
    """Each step (dialect_body's fields; `turn`: the next turn of one conversation, each
    proxy's with its own answers) sent to the proxy without warm CLIs, then to the one with
    them: asserts that the answers (ids and times aside) and `observe(send)` (what the CLI got,
    or sent the API, when `send()` made the request) are the same. Returns the steps the warm
    proxy answered with a waiting CLI."""
    conversation, took = {cold: [], warm: []}, []
    for step in steps:
        hits = warm.server.warm.hits
        got = []
        for p in (cold, warm):
            settle(p)
            fields = {k: v for k, v in step.items() if k != "turn"}
            history = conversation[p] if step.get("turn") else []
            answers = []

            def send():
                status, _, answer = p.request("POST", DIALECT_PATHS[dialect], dialect_body(
                    dialect, history=history, **fields))
                test.assertEqual(status, 200, answer)
                answers.append(answer)

            seen = observe(send)
            got.append((normalized(answers[0]), seen))
            if step.get("turn"):
                conversation[p] = history + [
                    {"role": "user", "content": fields["say"]},
                    {"role": "assistant", "content": answer_text(dialect, answers[0])}]
        test.assertEqual(got[0], got[1], (dialect, step))
        if warm.server.warm.hits > hits:
            took.append(step["say"].split(" ")[0] if not step.get("turn") else
                        " ".join(step["say"].split(" ")[:2]))
    return took


class WarmTest(FakeClaudeMixin, unittest.TestCase):
    """CLI processes started ahead of requests (WarmPool), with the fake CLI (which, as
    2.1.331, loads a resumed session and its MCP servers before it reads stdin, and answers
    control requests): which requests take one, that they answer as a fresh CLI does, and that
    none is ever stale, left behind or in a request's way."""

    def setUp(self):
        super().setUp()
        self.own_temp_dir("proxy-warm-")  # no preamble learnt yet

    def settle(self, p):
        """Once every shape the pool wants has its process waiting: their pids."""
        wait_until(p.server.warm.settled, what="the warm processes to be started")
        return [process.pid for process in p.server.warm.idle_processes()]

    def ask(self, p, content="hi", **fields):
        status, _, body = p.chat(content, **fields)
        self.assertEqual(status, 200, body)
        return body, self.runs()[-1]

    def one_shape_waiting(self, p):
        """A shape used once after the day's learning run: the pid of the CLI it has waiting."""
        self.ask(p, "learn")
        self.ask(p, "one")
        waiting = self.settle(p)
        self.assertEqual(len(waiting), 1)
        return waiting

    def two_shapes_waiting(self, p):
        """(With --warm 2.) Two shapes used once each, plain and with a tool: the pids of the
        CLI each has waiting."""
        self.ask(p, "learn")
        self.ask(p, "one")
        self.ask(p, "tools", tools=[{"type": "function", "function": {"name": "f"}}])
        waiting = self.settle(p)
        self.assertEqual(len(waiting), 2)
        return waiting

    @mock.patch.object(proxy, "WARM_STEADY", 0.0)  # one CLI per shape here
    def test_a_request_of_a_shape_used_before_takes_a_waiting_cli(self):
        p = self.start_proxy(warm=1)
        self.ask(p, "learn")  # a day's first run learns the session preamble: it never waits
        self.assertEqual(self.settle(p), [])
        _, fresh = self.ask(p, "one")  # the shape's first request misses; one is started
        waiting = self.settle(p)
        self.assertEqual(len(waiting), 1)
        self.assertEqual([w.launch.request.turns for w in p.server.warm._wanted.values()], [[]],
                         "the shape is kept without the prompt (which may be megabytes)")
        wait_until(lambda: p.request("GET", "/health")[2]["requests_in_flight"] == 0,
                   what="only the warm CLI to be left, which is not a request in flight")
        asked_at = time.time()
        body, warm = self.ask(p, "two")
        self.assertEqual(body["choices"][0]["message"]["content"], "Hello from the fake API.")
        # Started before the request came (its pid was waiting), it read its line after: not
        # the time between the two the fake measures, which a slow machine can make ~0 (the
        # line is in the pipe before the fake's Python has begun), as a loaded machine showed.
        self.assertEqual(warm["pid"], waiting[0], "the waiting CLI answered")
        self.assertGreater(warm["read_at"], asked_at, "it waited for its line")
        self.assertEqual(warm["controls"], [], "the same model and system: only the line")
        self.assertEqual(what_the_cli_got(warm)["argv"], what_the_cli_got(fresh)["argv"])
        health = p.request("GET", "/health")[2]["warm"]
        self.assertEqual({k: health[k] for k in ("size", "hits", "misses", "hit_rate")},
                         {"size": 1, "hits": 1, "misses": 1, "hit_rate": 0.5})
        replacement = self.settle(p)
        self.assertEqual(len(replacement), 1)
        self.assertNotEqual(replacement[0], warm["pid"], "a new one waits for the next")

    @mock.patch.object(proxy, "WARM_STEADY", 0.0)  # one CLI per shape here
    def test_model_and_system_prompt_go_on_stdin_the_rest_is_a_shape_of_its_own(self):
        p = self.start_proxy(warm=1)
        for model in ("sonnet", "opus"):
            self.ask(p, "learn", model=model)
        self.ask(p, "one", model="sonnet")
        system = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "x"}]
        cases = [({"model": "opus"}, [{"subtype": "set_model", "model": "opus"}]),
                 ({"model": "opus", "messages": system},
                  [{"subtype": "initialize", "appendSystemPrompt": "Be terse."}]),
                 ({"model": "sonnet"}, [{"subtype": "initialize", "appendSystemPrompt": ""},
                                        {"subtype": "set_model", "model": "sonnet"}])]
        for fields, controls in cases:
            waiting = self.settle(p)
            _, run = self.ask(p, **fields)
            self.assertEqual(run["pid"], waiting[0], fields)
            self.assertEqual(run["controls"], controls, fields)
            self.assertEqual(run["model"], "claude-%s-5-5" % fields["model"])
            self.assertEqual(run["system"], "Be terse." if "messages" in fields else None)
        # Fixed at spawn: another tool list, output limit, effort or schema is another shape.
        for fields in ({"tools": [{"type": "function", "function": {"name": "f"}}]},
                       {"max_tokens": 50}, {"reasoning_effort": "low"}):
            waiting = self.settle(p)
            _, run = self.ask(p, **fields)
            self.assertNotIn(run["pid"], waiting, fields)

    def test_answers_are_the_same_with_warm_processes_or_without_in_every_dialect(self):
        cold, warm = self.start_proxy(warm=0), self.start_proxy(warm=3)
        for dialect in ("chat", "messages", "responses"):
            steps = [dict(say="learn"), dict(say="learn", model="opus"), dict(say="a"),
                     dict(say="b"), dict(say="c", model="opus"), dict(say="d", system="Terse."),
                     dict(say="e"), dict(say="f [[fake:words:30]]", tools=True),
                     dict(say="g", tools=True)] + [dict(say="turn %d" % n, turn=True)
                                                   for n in range(4)]
            took = warm_or_cold(self, cold, warm, dialect, steps, lambda send: (
                send(), what_the_cli_got(self.runs()[-1]))[1], self.settle)
            # The model and system prompt set on stdin (c, d, e), the same shape (b), tools (g),
            # a conversation's turns started when the answer before them came (2, 3).
            self.assertLessEqual({"b", "c", "d", "e", "g", "turn 2", "turn 3"}, set(took),
                                 dialect)
        self.assertEqual(cold.server.warm.hits + cold.server.warm.misses, 0)

    def test_a_conversation_s_next_turn_is_started_as_its_answer_streams(self):
        p = self.start_proxy(warm=2)
        self.ask(p, "learn")
        messages = [{"role": "user", "content": "one"}]
        pids = []
        for n in range(4):
            self.settle(p)
            status, _, events = p.stream(messages=messages, model="sonnet")
            self.assertEqual(status, 200)
            run = self.runs()[-1]
            pids.append(run["pid"])
            text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                           if e != "[DONE]" and e["choices"])
            messages = messages + [{"role": "assistant", "content": text},
                                   {"role": "user", "content": "turn %d" % (n + 2)}]
            if n >= 2:  # turn 2 went on a conversation: from then on each next turn waits
                self.assertIsNotNone(run["session"], "a resumed session")
                self.assertEqual(run["stdin"], [{"type": "user", "message": {
                    "role": "user", "content": "turn %d" % (n + 1)}}])
        self.assertEqual(p.server.warm.hits, 2, "turns 3 and 4")
        self.assertEqual(p.server.sessions.resumed, 3, "turns 2 to 4 resumed a session")
        # A new conversation, now that they go on here: its second turn is waiting too.
        body, _ = self.ask(p, "another")
        self.settle(p)
        status, _, body = p.chat(messages=[
            {"role": "user", "content": "another"},
            {"role": "assistant", "content": body["choices"][0]["message"]["content"]},
            {"role": "user", "content": "and?"}], model="sonnet")
        self.assertEqual(status, 200, body)
        self.assertEqual(p.server.warm.hits, 4, "its first turn (a shape) and its second")
        self.assertIsNotNone(self.runs()[-1]["session"])
        p.close()  # the session file written for a next turn that never came goes too
        self.assertEqual(session_files(self.home, p), [])

    def test_a_warm_cli_that_waited_too_long_or_died_or_was_upgraded_is_never_used(self):
        p = self.start_proxy(warm=1, warm_idle=0.5)
        self.ask(p, "learn")
        self.ask(p, "one")
        first = self.settle(p)[0]
        # Past --warm-idle it is replaced, while its shape is in use.
        wait_until(lambda: not alive(first), what="the warm CLI to be ended")
        self.assertNotIn(first, self.settle(p), "another one waits instead")
        p.server.warm.idle_limit = 300.0
        dead = self.settle(p)[0]
        with self.assertLogs("claude_max_proxy", "WARNING"):
            os.killpg(dead, signal.SIGKILL)
            wait_until(lambda: not alive(dead), what="it to be dead")
            misses = p.server.warm.misses
            _, run = self.ask(p, "after a crash")
        self.assertNotEqual(run["pid"], dead)
        self.assertLessEqual(p.server.warm.misses, misses + 1)
        # An upgraded CLI (another file at its path): the waiting one is not used.
        old = self.settle(p)[0]
        with open(self.fake_path + ".new", "w") as f:
            f.write("#!%s\n%s" % (sys.executable, FAKE_CLAUDE))
        os.chmod(self.fake_path + ".new", 0o755)
        os.replace(self.fake_path + ".new", self.fake_path)
        _, run = self.ask(p, "after an upgrade")
        self.assertNotEqual(run["pid"], old)
        wait_until(lambda: not alive(old), what="the old CLI to end")

    def test_a_warm_cli_killed_as_it_is_handed_a_request_leaves_it_to_a_fresh_one(self):
        """Killed between the pool's last look and its request's line (the OOM killer, an
        upgrade): the request runs on a fresh CLI, transparently; before, the line the real
        CLI prints while it waits (ui_invalidate) made it count as having answered: a 502."""
        p = self.start_proxy(warm=1)
        waiting = self.one_shape_waiting(p)
        open(os.path.join(self.log_dir, "die-on-line"), "w").close()
        with self.assertLogs("claude_max_proxy", "INFO") as logs:
            for stream in (False, True):
                if stream:
                    waiting = self.settle(p)
                    open(os.path.join(self.log_dir, "die-on-line"), "w").close()
                    status, _, events = p.stream("two")
                    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                                   if e != "[DONE]" and e["choices"])
                else:
                    status, _, body = p.chat("two")
                    text = body["choices"][0]["message"]["content"] if status == 200 else body
                self.assertEqual((status, text), (200, "Hello from the fake API."), stream)
                self.assertFalse(alive(waiting[0]))
                self.assertNotEqual(self.runs()[-1]["pid"], waiting[0], "a fresh CLI answered")
            # (A request's log line is written after its answer.)
            wait_until(lambda: sum("warm=ended" in line for line in logs.output) == 2,
                       what="both requests' log lines to say so")
        self.assertFalse(os.path.exists(os.path.join(self.log_dir, "die-on-line")))

    def test_warm_clis_that_die_while_they_wait_are_replaced_and_never_handed_out(self):
        p = self.start_proxy(warm=2)
        waiting = self.two_shapes_waiting(p)
        with self.assertLogs("claude_max_proxy", "WARNING") as logs:
            for pid in waiting:
                os.kill(pid, signal.SIGKILL)
            # No request needed: the pool sees them dead and starts others.
            wait_until(lambda: len(set(self.settle(p)) - set(waiting)) == 2, timeout=15,
                       what="two new warm CLIs in place of the dead ones")
        self.assertEqual(len([r for r in logs.records if "died while it waited" in
                              r.getMessage()]), 2)
        hits = p.server.warm.hits
        for fields in ({}, {"tools": [{"type": "function", "function": {"name": "f"}}]}):
            status, _, body = p.chat("after the kill", **fields)
            self.assertEqual(status, 200, body)
            self.assertNotIn(self.runs()[-1]["pid"], waiting)
        self.assertEqual(p.server.warm.hits, hits + 2, "each took a live one")

    def test_a_cli_that_dies_at_every_start_gives_one_clear_error_and_no_loop(self):
        p = self.start_proxy(warm=1)
        waiting = self.one_shape_waiting(p)
        open(os.path.join(self.log_dir, "die-at-start"), "w").close()
        with self.assertLogs("claude_max_proxy", "WARNING") as logs:
            os.kill(waiting[0], signal.SIGKILL)
            # Replaced once; that one dies too, and the pool stops until a request comes.
            wait_until(lambda: p.server.warm.settled() and not p.server.warm._wanted,
                       timeout=15, what="the pool to give up on the shape")
            started = p.server.processes_started
            self.assertLessEqual(started, 2 + 2, "the learning run, 'one', two warm tries")
            status, _, body = p.chat("two")
            self.assertEqual(status, 502)
            self.assertIn("cannot start (a broken install)", body["error"]["message"])
            wait_until(lambda: p.server.warm.settled(), what="the pool to settle")
        self.assertIn("none is started again until a request needs one", logs.output[-1])
        self.assertLessEqual(p.server.processes_started, started + 2,
                             "the request's own CLI and at most one warm try")
        os.unlink(os.path.join(self.log_dir, "die-at-start"))  # mended: served again
        self.assertEqual(p.chat("three")[0], 200)

    def test_a_shape_in_steady_use_keeps_a_second_cli_for_a_request_at_once(self):
        p = self.start_proxy(warm=1)
        self.ask(p, "learn")
        self.ask(p, "one")  # the shape's first request: one CLI for the next
        self.assertEqual(len(self.settle(p)), 1)
        self.ask(p, "two")  # taken again: in steady use, two wait from now on
        waiting = self.settle(p)
        self.assertEqual(len(waiting), 2)
        hits = p.server.warm.hits
        _, first = self.ask(p, "three")
        _, second = self.ask(p, "four")  # sent the moment the answer came
        self.assertEqual([first["pid"], second["pid"]], waiting)
        self.assertEqual(p.server.warm.hits, hits + 2)
        self.assertEqual(p.request("GET", "/health")[2]["warm"]["ready"], 0)
        self.assertEqual(len(self.settle(p)), 2)
        # Another shape in steady use takes the spare over: one spare in all.
        tools = {"tools": [{"type": "function", "function": {"name": "f"}}]}
        for _ in range(2):
            self.ask(p, "tools", **tools)
        self.settle(p)
        self.assertEqual(sorted(w.copies for w in p.server.warm._wanted.values()), [2])

    def test_no_warm_cli_starts_while_an_answer_goes_out(self):
        """Starting one costs ~0.9 CPU-seconds, which would slow the stream being answered:
        a replacement waits until no request is in flight."""
        p = self.start_proxy(warm=1)
        waiting = self.one_shape_waiting(p)
        answering = threading.Thread(target=lambda: p.chat("[[fake:gate:go]]"))
        answering.start()
        wait_until(lambda: [r for r in self.runs() if r["pid"] == waiting[0]],
                   what="the waiting CLI to take the request")
        self.assertEqual(p.server.quiet_for(), None)
        open(os.path.join(self.log_dir, "go"), "w").close()
        answering.join(30)
        self.assertEqual(len(self.settle(p)), 2, "the replacement, and a spare: used twice")
        first = min(process.spawned for process in p.server.warm.idle_processes())
        self.assertGreaterEqual(first - p.server.quiet_since, proxy.WARM_QUIET,
                                "started once the answer was out and the daemon quiet")

    def test_a_request_never_waits_for_an_idle_warm_cli(self):
        p = self.start_proxy(warm=1, max_concurrency=1, queue_timeout=5.0)
        self.ask(p, "learn")
        self.ask(p, "one")
        waiting = self.settle(p)  # it holds the only slot
        self.assertEqual(p.server.slots.running, 1)
        _, run = self.ask(p, "tools", tools=[{"type": "function", "function": {"name": "f"}}])
        self.assertNotIn(run["pid"], waiting)
        self.assertFalse(alive(waiting[0]), "the idle CLI was ended for it")
        self.assertEqual(len(self.settle(p)), 1, "the tools shape's own warm CLI now")
        self.assertEqual(p.server.slots.running, 1)
        # Also while another request holds the slot's warm CLI ready: reclaimed, not waited on.
        status, _, body = p.chat("plain again")
        self.assertEqual(status, 200, body)

    def test_timeouts_count_from_the_request_not_from_the_spawn(self):
        p = self.start_proxy(warm=1, timeout=1.0, idle_timeout=1.0)
        self.ask(p, "learn")
        self.ask(p, "one")
        self.settle(p)
        process = p.server.warm.idle_processes()[0]
        wait_until(lambda: time.monotonic() - process.spawned > 1.5, what="1.5 s of waiting")
        _, run = self.ask(p, "two")
        self.assertEqual(run["pid"], process.pid)

    def test_a_cli_without_control_requests_gets_the_request_fresh_and_shapes_get_strict(self):
        with mock.patch.dict(os.environ, {"FAKE_CLAUDE_NO_CONTROL": "1"}), \
                mock.patch.object(proxy, "CONTROL_TIMEOUT", 0.3), \
                self.assertLogs("claude_max_proxy", "WARNING") as logs:
            p = self.start_proxy(warm=1)
            for model in ("sonnet", "opus"):
                self.ask(p, "learn", model=model)
            self.ask(p, "one")
            waiting = self.settle(p)
            _, run = self.ask(p, "two", model="opus")  # set_model goes unanswered
            self.assertNotEqual(run["pid"], waiting[0], "a fresh CLI answered")
            self.assertEqual(run["model"], "claude-opus-5-5")
            self.assertTrue(p.server.warm.strict)
            self.assertFalse(alive(waiting[0]))
            self.ask(p, "three", model="opus")  # the model is part of the shape now
            waiting = self.settle(p)
            _, run = self.ask(p, "four", model="opus")
            self.assertEqual((run["pid"], run["model"]), (waiting[0], "claude-opus-5-5"))
            _, run = self.ask(p, "five", model="sonnet")
            self.assertNotEqual(run["pid"], waiting[0], "another model: another shape")
        self.assertEqual(len([r for r in logs.records if "warm" in r.getMessage()]), 1)

    @mock.patch.object(proxy, "WARM_STEADY", 0.0)  # one CLI per shape here
    def test_faults_and_clients_that_leave_leak_nothing_with_warm_clis(self):
        p = self.start_proxy(warm=2, idle_timeout=0.5)
        self.ask(p, "learn")
        self.ask(p, "one")
        self.ask(p, "tools", tools=[{"type": "function", "function": {"name": "f"}}])
        seen = set(self.settle(p))
        fds, threads = open_fds(), threading.active_count()
        # (what the model is asked, the status): each taken by a waiting CLI
        for content, status in (("[[fake:exit:7]]", 502), ("[[fake:diemid]]", 502),
                                ("[[fake:hang]]", 504), ("[[fake:silent]]", 504), ("hi", 200)):
            got, _, body = p.chat(content)
            self.assertEqual(got, status, (content, body))
            seen.update(self.settle(p))
        # A client that leaves while a waiting CLI answers it, and one that leaves at once.
        for content in ("[[fake:drip:0.01]]", "hi"):
            asked = p.server.warm.hits + p.server.warm.misses
            sock = send_chat(p.port, chat_body(content, stream=True, model="claude-sonnet-4"))
            if "drip" in content:
                self.assertEqual(sock.recv(12), b"HTTP/1.1 200")
            sock.close()
            wait_until(lambda: p.server.warm.hits + p.server.warm.misses > asked and
                       p.server.chats == 0, what="the request to be taken, and to end")
            seen.update(self.settle(p))
        self.assertGreaterEqual(p.server.warm.hits, 7)
        runs = self.runs()
        self.assertEqual(len(seen), len(set(seen)))
        wait_until(lambda: open_fds() <= fds, what="descriptors to return to %d" % fds)
        self.assertLessEqual(threading.active_count(), threads)
        p.close()
        for pid in seen | {run["pid"] for run in runs}:
            self.assertFalse(alive(pid), pid)
        self.assert_no_cli_left(p, runs)
        self.assertEqual(session_files(self.home), [])

    def test_shutdown_ends_the_waiting_clis_and_warm_zero_starts_none(self):
        p = self.start_proxy(warm=2)
        waiting = self.two_shapes_waiting(p)
        p.close()
        for pid in waiting:
            self.assertFalse(alive(pid), "ended at shutdown")
        self.assertEqual(p.server.processes, set())
        self.assertFalse(os.path.exists(p.server.workdir))
        off = self.start_proxy(warm=0)
        self.ask(off, "one")
        self.ask(off, "one")
        wait_until(lambda: not off.server.processes, what="the runs to end")
        self.assertEqual(off.server.warm.hits + off.server.warm.misses, 0)
        self.assertEqual(off.request("GET", "/health")[2]["warm"]["ready"], 0)


class LeakTest(FakeClaudeMixin, unittest.TestCase):
    def test_cli_faults_leave_the_daemon_healthy_and_leak_nothing(self):
        p = self.start_proxy(idle_timeout=0.5)
        self.assertEqual(p.chat()[0], 200)  # warms up lazily created state
        before, threads = open_fds(), threading.active_count()
        # (prompt, status, status when streamed, last streamed event)
        cases = [("[[fake:diemid]]", 502, 200, "error"),  # crashes mid-answer
                 ("[[fake:exit:7]]", 502, 502, None),  # exits before answering
                 ("[[fake:hang]]", 504, 504, None),  # hangs before printing anything
                 ("[[fake:silent]]", 504, 504, None),  # starts, then hangs
                 ("[[fake:drip]]", 504, 200, "error"),  # answers forever (whole-request timeout)
                 ("[[fake:garbage]]", 200, 200, "[DONE]"),  # noise between its lines
                 ("[[fake:bigdelta:3000000]]", 502, 200, "error")]  # a line over the limit
        with mock.patch.object(proxy, "MAX_CLI_LINE_BYTES", 1 << 20):
            for content, status, stream_status, last in cases:
                p.server.settings.timeout = 2.0 if "drip" in content else 30.0
                got, _, body = p.chat(content)
                self.assertEqual(got, status, content)
                self.assertEqual("error" in body, status != 200, content)
                got, _, events = p.stream(content)
                self.assertEqual(got, stream_status, content)
                if got == 200:
                    self.assertEqual("[DONE]" if events[-1] == "[DONE]" else "error" if "error"
                                     in events[-1] else events[-1], last, content)
                self.assertEqual(p.request("GET", "/health")[0], 200)
        self.assert_no_cli_left(p)
        if before is not None:
            wait_until(lambda: open_fds() <= before, what="descriptors to return to %d" % before)
        wait_until(lambda: threading.active_count() <= threads, what="threads to end")


    def test_no_descriptors_or_processes_leak(self):
        p = self.start_proxy()
        self.assertEqual(p.chat()[0], 200)  # warms up lazily created state
        before = open_fds()
        tools = [{"type": "function", "function": {"name": "f"}}]
        for i in range(15):
            status, _, _ = p.chat("[[fake:err529]]" if i % 3 == 0 else "hi")
            self.assertEqual(status, 503 if i % 3 == 0 else 200)
            status, _, _ = p.chat("[[fake:call:f:{}]]" + ("[[fake:stall]]" if i % 2 else ""),
                                  tools=tools)
            self.assertEqual(status, 200)
            status, _, events = p.stream("hi", stream_options={"include_usage": True})
            self.assertEqual((status, events[-1]), (200, "[DONE]"))
            # A conversation (a resumed session), also one whose client leaves mid-answer.
            history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                       {"role": "user", "content": "[[fake:slow:0.2]]" if i % 2 else "again"}]
            if i % 2:
                conn = p.connect()
                conn.request("POST", "/v1/chat/completions", json.dumps(dict(
                    chat_body(model="claude-sonnet-4"), messages=history, stream=True)),
                    {"Content-Type": "application/json"})
                self.assertEqual(conn.getresponse().status, 200)
                conn.close()
            else:
                self.assertEqual(p.chat(messages=history)[0], 200)
        self.assert_no_cli_left(p)
        self.assertGreaterEqual(p.server.sessions.resumed, 15)
        if before is not None:
            wait_until(lambda: open_fds() <= before, what="descriptors to return to %d" % before)
        self.assertEqual(sorted(os.listdir(p.server.workdir)), ["pid"],
                         "no system prompt, tools file or session marker left")
        self.assertEqual({r["cwd"] for r in self.runs()}, {p.server.cwd})
        self.assertEqual(session_files(), [], "no session file left")


class MalformedInputTest(FakeClaudeMixin, unittest.TestCase):
    """Generated bad requests against one live server: every one gets a 4xx JSON error (the
    two HTTP/2 request lines get the 505 RFC 9110 prescribes), none starts a CLI, and the
    server is healthy and holds no more descriptors or threads afterwards."""

    KEY = (("Host", "127.0.0.1"), ("Authorization", "Bearer fuzz"))
    JSON = KEY + (("Content-Type", "application/json"),)
    # Wrong values for each request field, by kind; every one must be refused.
    NOT_A_STRING = [None, True, 0, -1, 1.5, 10 ** 400, 1e308, [], ["x"], {}, {"x": "y"}]
    NOT_A_BOOL = [0, 1, -1, 1.5, 10 ** 400, "", "true", [], {}]
    NOT_A_COUNT = [True, False, 0, -1, 1.5, 10 ** 400, -10 ** 400, 1e308, 2 ** 31, "", "10",
                   [], [1], {}]
    OUT_OF_RANGE = [True, -0.01, 10 ** 400, -10 ** 400, 1e308, float("inf"), "", "1", [], {}]
    FIELDS = {
        "model": NOT_A_STRING + ["", "   ", "gpt-4o", "x" * 100000, "claude-sonnet-4\x00",
                                 "\ud800", "openai/", "claude-9-giant"],
        "messages": NOT_A_STRING[:-2] + ["hi", [None], [[]], [{}], ["hi"], [1]] + [
            [{"role": "user"}], [{"role": "user", "content": None}],
            [{"role": "user", "content": ""}], [{"role": "user", "content": "  \n"}],
            [{"role": "user", "content": []}], [{"role": "user", "content": 5}],
            [{"role": "wizard", "content": "x"}], [{"role": None, "content": "x"}],
            [{"role": ["user"], "content": "x"}], [{"role": "assistant", "content": "x"}],
            [{"role": "system", "content": "only instructions"}],
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
            [{"role": "tool", "content": "x", "tool_call_id": "1"}],
            [{"role": "user", "content": "x", "tool_calls": [{"id": "1"}]}],
            [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
             {"role": "user", "content": "x"}],
            [{"role": "user", "content": [{"type": "audio", "input_audio": {}}]}],
            [{"role": "user", "content": [{"type": "text"}]}],
            [{"role": "user", "content": [{"type": "text", "text": 5}]}],
            [{"role": "user", "content": [{"text": "no type"}]}],
            [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}],
            [{"role": "user", "content": [{"type": "image_url",
                                           "image_url": {"url": "ftp://example.com/a.png"}}]}],
            [{"role": "user", "content": [{"type": "image_url", "image_url": {
                "url": "data:image/png;base64,!!!not base64!!!"}}]}],
            [{"role": "user", "content": [{"type": "image_url", "image_url": {
                "url": "data:text/html;base64,PGgxPg=="}}]}],
            [{"role": "user", "content": [None] * 100000}],  # oversized and wrong
            [{"role": "user", "content": "x"}] * 50000 + [{"role": "tool", "content": "x"}],
            [{"role": "user", "content": "\ud800 unpaired"}]],
        "stream": NOT_A_BOOL,
        "stream_options": [True, 0, "x", [], {"include_usage": "yes"}, {"include_usage": 1}],
        "max_tokens": NOT_A_COUNT,
        "max_completion_tokens": NOT_A_COUNT,
        "stop": [True, 0, 1.5, "", [None], [[]], {}, [""], [1], ["a"] * 5, ["a"] * 100000],
        "n": [True, False, 0, -1, 2, 1.5, 10 ** 400, "1", [], {}],
        "temperature": OUT_OF_RANGE + [2.01],
        "top_p": OUT_OF_RANGE + [1.01],
        "presence_penalty": OUT_OF_RANGE[:1] + OUT_OF_RANGE[2:] + [-2.01, 2.01],
        "frequency_penalty": OUT_OF_RANGE[:1] + OUT_OF_RANGE[2:] + [-2.01, 2.01],
        "logprobs": [True, 1, "yes", [1], {"a": 1}],
        "tools": ["x", {"a": 1}, 1, [1], [None], [{"type": "function"}], [{"type": "retrieval"}],
                  [{"type": "function", "function": {"name": "a b"}}],
                  [{"type": "function", "function": {"name": "x" * 65}}],
                  [{"type": "function", "function": {"name": "f", "parameters": []}}],
                  [{"type": "function", "function": {"name": "f", "parameters": {
                      "type": "array"}}}],
                  [{"type": "function", "function": {"name": "f"}}] * 2],
        "functions": [1, [1], [{"name": 5}], [{"name": "f", "parameters": "x"}]],
        "tool_choice": [{}, 1, True, "always", {"type": "function", "function": {
            "name": "nope"}}],
        "function_call": [1, "always", {"name": "nope"}],
        "parallel_tool_calls": NOT_A_BOOL,
        "response_format": ["json", 1, [], {}, {"type": 5}, {"type": "json_schema"},
                            {"type": "json_schema", "json_schema": {"schema": []}}],
    }

    def bad_bodies(self):
        """(what, raw body) for every bad JSON body."""
        for field, values in self.FIELDS.items():
            for value in values:
                body = chat_body()
                body[field] = value
                raw = json.dumps(body).encode("utf-8", "surrogatepass")
                yield "%s=%.60r" % (field, value), raw
        for body in ([], "x", 1, None, True, [chat_body()]):
            yield "body %r" % (body,), json.dumps(body).encode()
        deep = 5000
        for what, raw in [
                ("empty", b""), ("truncated", b'{"model": "opus"'), ("single quotes", b"{'a': 1}"),
                ("NaN", b'{"model": "opus", "temperature": NaN}'),
                ("Infinity", b'{"model": "opus", "temperature": -Infinity}'),
                ("huge exponent", json.dumps(chat_body()).encode()[:-1] + b', "top_p": 1e99999}'),
                ("deep arrays", b"[" * deep + b"]" * deep),
                ("deep objects", b'{"a":' * deep + b"1" + b"}" * deep),
                ("deep in a field", json.dumps(chat_body()).encode()[:-1] + b', "user": '
                 + b"[" * deep + b"]" * deep + b"}"),
                ("invalid UTF-8", b'{"model": "opus", "messages": [{"role": "user", '
                                  b'"content": "\xff\xfe"}]}'),
                ("overlong UTF-8", b'{"model": "\xc0\xaf"}'),
                ("NUL bytes", b"\x00" * 100),
                ("trailing data", json.dumps(chat_body()).encode() + b" {}"),
                ("lone surrogate escape", json.dumps(chat_body()).encode().replace(
                    b'"hi"', b'"\\udc00"'))]:
            yield what, raw

    def bad_requests(self, port):
        """(what, raw request, expected status or None for any 4xx)."""
        body = json.dumps(chat_body()).encode()

        def post(headers, data=body):
            return b"POST /v1/chat/completions HTTP/1.1\r\n" + b"".join(
                b"%s: %s\r\n" % (k.encode("latin-1"), v.encode("latin-1")) for k, v in headers
            ) + b"\r\n" + data

        length = (("Content-Length", str(len(body))),)
        for what, raw in self.bad_bodies():
            yield what, post(self.JSON + (("Content-Length", str(len(raw))),), raw), None
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; "
                     "boundary=x", "application/jsonx", "json", ""):
            yield "Content-Type " + kind, post(self.KEY + (("Content-Type", kind),) + length), 415
        yield "no Content-Type", post(self.KEY + length), 415
        for value in ("", "x", "-1", "1e3", "0x10", "1, 1", " 12 3", "\u00b2",
                      "99999999999999999999999999"):
            yield "Content-Length %r" % value, post(self.JSON + (("Content-Length", value),)), None
        yield "Transfer-Encoding", post(self.JSON + (("Transfer-Encoding", "gzip, chunked"),)
                                        + length), 411
        for line in (b"Bad header line", b"X Foo: bar", b" folded onto the line above",
                     b":no name", b"\x00\x01\x02"):
            request_line, rest = post(self.JSON + length).split(b"\r\n", 1)
            yield "header line %r" % line, (request_line + b"\r\nX-A: 1\r\n" + line + b"\r\n"
                                            + rest), 400
        yield "101 headers", post(self.JSON + length + tuple(
            ("X-%d" % i, "x") for i in range(101))), 431
        yield "a 70 kB header", post(self.JSON + length + (("X-Big", "x" * 70000),)), 431
        for host in ("evil.example", "127.0.0.1\x00.evil", "localhost:3456:1", "[::1"):
            yield "Host %r" % host, post((("Host", host),) + self.JSON[1:] + length), None
        for origin in ("https://evil.example", "null", "\x00", "http://127.0.0.1:%d" % port):
            yield "Origin %r" % origin, post(self.JSON + length + (("Origin", origin),)), 403
        for auth in ("Bearer", "Bearer fuzz2", "Bearer fuzz fuzz", "Basic ZnV6eg==", "fuzz",
                     "Bearer \u00e9", "x" * 60000):
            yield "Authorization %.20r" % auth, post(self.JSON[:1] + self.JSON[2:] + length + (
                ("Authorization", auth),)), 401
        for line in (b"NONSENSE", b"GET", b"GET /health", b"GET /health HTTP/1.1 extra",
                     b"GET /health HTTP/1.x", b"GET /health FTP/1.1", b"GET /health HTTP/1",
                     b"GET /health HTTP/0.9", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
                     b"GET /" + b"a" * 70000 + b" HTTP/1.1", b"BREW /v1/models HTTP/1.1",
                     b"get /v1/models HTTP/1.1", b"CONNECT 127.0.0.1:443 HTTP/1.1",
                     b"GET http://evil.example/v1/models HTTP/1.1", b"GET /v1/mod\x00els HTTP/1.1",
                     b"DELETE /v1/chat/completions HTTP/1.1", b"GET /v1/../../etc/passwd HTTP/1.1",
                     b"OPTIONS /nowhere HTTP/1.1"):
            yield "request line %.40r" % line, line + b"\r\nHost: 127.0.0.1\r\nAuthorization: " \
                b"Bearer fuzz\r\n\r\n", None
        for line in (b"GET /health HTTP/2.0", b"PRI * HTTP/2.0"):
            yield "request line %r" % line, line + b"\r\n\r\nSM\r\n\r\n", 505

    def test_every_bad_request_is_a_4xx_json_error_and_the_server_stays_healthy(self):
        p = self.start_proxy(api_keys=["fuzz"])
        p.request("GET", "/health")  # warm up lazily created state
        before, threads = open_fds(), threading.active_count()
        count = 0
        for what, data, expected in self.bad_requests(p.port):
            count += 1
            with self.subTest(what):
                status, response, body = raw_request(p.port, data=data)
                if expected is None:
                    self.assertTrue(400 <= status < 500, "%s: %d" % (what, status))
                else:
                    self.assertEqual(status, expected, what)
                self.assertEqual(response.getheader("Content-Type"), "application/json", what)
                self.assertIsInstance(body["error"]["message"], str, what)
        self.assertGreater(count, 250)
        self.assertEqual(self.runs(), [], "no bad request started a CLI")
        self.assertEqual(p.request("GET", "/health")[0], 200)
        status, _, body = p.request("POST", "/v1/chat/completions", chat_body(),
                                    headers={"Authorization": "Bearer fuzz"})
        self.assertEqual((status, body["choices"][0]["message"]["content"]),
                         (200, "Hello from the fake API."))
        wait_until(lambda: p.server.connections == 0, what="every connection to close")
        if before is not None:
            wait_until(lambda: open_fds() <= before, what="descriptors to return to %d" % before)
        wait_until(lambda: threading.active_count() <= threads, what="threads to end")


class BodyEncodingTest(FakeClaudeMixin, unittest.TestCase):
    """Bodies must be UTF-8 text: every endpoint answers what is not with a 400 that says why,
    and no request is left without an answer."""

    BAD = "x\ud800y"  # a lone surrogate: no UTF-8 text can hold it
    BODIES = {  # path -> (body, the field of the prompt, the field of the system prompt)
        "/v1/chat/completions": (lambda prompt, system: {"model": "sonnet", "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": prompt}]},
            "messages[1].content", "messages[0].content"),
        "/v1/messages": (lambda prompt, system: {"model": "sonnet", "max_tokens": 10,
                                                 "system": system, "messages": [
                                                     {"role": "user", "content": prompt}]},
                         "messages[0].content", "system"),
        "/v1/responses": (lambda prompt, system: {"model": "sonnet", "instructions": system,
                                                  "input": prompt}, "input", "instructions")}

    def error_text(self, body):
        return body["error"]["message"]

    def test_lone_surrogates_raw_or_escaped_are_a_400_naming_the_field(self):
        p = self.start_proxy()
        for path, (make, prompt_field, system_field) in self.BODIES.items():
            for field, body in ((prompt_field, make(self.BAD, "Be terse.")),
                                (system_field, make("hi", self.BAD))):
                # Raw: the UTF-8 encoding of the surrogate (ED A0 80); escaped: \ud800.
                for how, raw in (("raw", json.dumps(body, ensure_ascii=False).encode(
                        "utf-8", "surrogatepass")), ("escaped", json.dumps(body).encode())):
                    with self.subTest(path=path, field=field, how=how):
                        status, response, answer = p.request("POST", path, raw=raw)
                        self.assertEqual(status, 400, answer)
                        self.assertEqual(answer["error"]["type"], "invalid_request_error")
                        self.assertIn("`%s`" % field, self.error_text(answer))
                        self.assertIn("unpaired surrogate", self.error_text(answer))
        # A pair is a character: it goes through.
        status, _, answer = p.request("POST", "/v1/chat/completions",
                                      raw=json.dumps(chat_body("\U0001f600")).encode())
        self.assertEqual(status, 200, answer)
        self.assertEqual(self.only_run()["stdin"][0]["message"]["content"], "\U0001f600")
        self.assertEqual([n for n in os.listdir(p.server.workdir) if n.endswith(".txt")], [],
                         "no run's file (system-*.txt) left behind")

    def test_utf16_and_utf32_bodies_are_refused_a_utf8_byte_order_mark_is_not(self):
        p = self.start_proxy()
        text = json.dumps(chat_body("hi"))
        for encoding in ("utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"):
            status, _, answer = p.request("POST", "/v1/chat/completions",
                                          raw=text.encode(encoding))
            self.assertEqual(status, 400, encoding)
            self.assertIn("must be JSON encoded as UTF-8", self.error_text(answer), encoding)
        self.assertEqual(self.runs(), [])
        status, _, answer = p.request("POST", "/v1/chat/completions",
                                      raw=b"\xef\xbb\xbf" + text.encode())
        self.assertEqual(status, 200, answer)

    def test_a_request_that_fails_inside_the_daemon_still_gets_an_answer(self):
        """A bug (here made by a mock) is a 500 in the dialect's shape with its traceback in
        the log, not a connection closed without a word; a run's files go on every path."""
        p = self.start_proxy()
        with mock.patch.object(proxy.Messages, "parse", side_effect=RuntimeError("a bug")), \
                self.assertLogs("claude_max_proxy", "ERROR") as logs:
            status, _, answer = p.request("POST", "/v1/messages", {"model": "sonnet"})
        self.assertEqual((status, answer["type"], answer["error"]["type"]),
                         (500, "error", "api_error"))
        self.assertIn("RuntimeError: a bug", "\n".join(logs.output))
        with mock.patch.object(proxy.ClaudeProcess, "__init__",
                               side_effect=UnicodeEncodeError("utf-8", "", 0, 1, "a bug")), \
                self.assertLogs("claude_max_proxy", "ERROR"):
            status, _, answer = p.request("POST", "/v1/chat/completions", chat_body("hi"))
        self.assertEqual((status, answer["error"]["code"]), (500, "internal_error"))
        self.assertEqual(p.request("GET", "/health")[0], 200)
        # A run whose file cannot be written leaves none: the files go with the error.
        with mock.patch.object(proxy.Launch, "files", lambda launch: {
                "system": "fine", "other": "x\ud800"}):
            with self.assertLogs("claude_max_proxy", "ERROR"):
                status, _, _ = p.request("POST", "/v1/chat/completions", chat_body("hi"))
        self.assertEqual(status, 500)
        self.assertEqual([n for n in os.listdir(p.server.workdir) if n.endswith(".txt")], [])


class SubscriptionServerTest(FakeClaudeMixin, unittest.TestCase):
    """The subscription as the daemon sees it, serves it and keeps it, with the fake CLI
    printing the rate_limit_event the real one prints on a claude.ai login."""

    WEATHER = [{"type": "function", "function": {"name": "get_weather"}}]
    DIALECTS = {"/v1/chat/completions": lambda content, **f: dict(chat_body(content), **f),
                "/v1/messages": lambda content, **f: dict({
                    "model": "sonnet", "max_tokens": 50,
                    "messages": [{"role": "user", "content": content}]}, **f),
                "/v1/responses": lambda content, **f: dict({"model": "sonnet", "input": content},
                                                           **f)}

    def setUp(self):
        super().setUp()
        self.own_temp_dir("proxy-usage-")  # its own state file

    def report(self, **info):
        """What the API's headers say from now on: the fake CLI's rate_limit_event."""
        with open(os.path.join(self.log_dir, "unified.info"), "w") as f:
            json.dump(info, f)

    def warning(self, five_hour=0.91, resets_in=3600, **more):
        now = int(time.time())
        return dict({"status": "allowed_warning", "resetsAt": now + resets_in,
                     "rateLimitType": "five_hour", "utilization": five_hour,
                     "isUsingOverage": False, "unifiedWindows": {
                         "five_hour": {"utilization": five_hour, "resetsAt": now + resets_in,
                                       "status": "allowed_warning", "surpassedThreshold": 0.9},
                         "seven_day": {"utilization": 0.4, "resetsAt": now + 86400,
                                       "status": "allowed"}}}, **more)

    def usage(self, p, path="/v1/usage"):
        status, response, body = p.request("GET", path)
        self.assertEqual(status, 200, body)
        return body

    @staticmethod
    def unified(response):
        return {k.lower(): v for k, v in response.getheaders()
                if k.lower().startswith("anthropic-ratelimit-unified-")}

    def test_usage_and_headers_in_every_dialect(self):
        p = self.start_proxy()
        p.server.login.check()
        for path in ("/v1/usage", "/usage"):
            body = self.usage(p, path)
            self.assertEqual({k: body[k] for k in ("object", "auth", "updated_at", "status",
                                                   "windows", "overage", "reserve_percent",
                                                   "allow_extra_usage")},
                             {"object": "usage", "auth": {"logged_in": True,
                                                          "method": "oauth_token"},
                              "updated_at": None, "status": None, "windows": {},
                              "overage": {"status": None, "in_use": False},
                              "reserve_percent": 0, "allow_extra_usage": False})
            self.assertEqual(body["totals"]["requests"], 0)
        status, response, _ = p.chat("before any report")
        self.assertEqual((status, self.unified(response)), (200, {}), "nothing known: none")
        self.report(**self.warning(overageStatus="allowed"))
        for path, make in self.DIALECTS.items():
            for stream in (False, True):
                status, response, body = p.request("POST", path, make("hi", stream=stream))
                self.assertEqual(status, 200, body)
                headers = self.unified(response)
                self.assertEqual((headers.get("anthropic-ratelimit-unified-status"),
                                  headers.get("anthropic-ratelimit-unified-5h-utilization"),
                                  headers.get("anthropic-ratelimit-unified-7d-utilization"),
                                  headers.get("anthropic-ratelimit-unified-overage-status"),
                                  headers.get("anthropic-ratelimit-unified-overage-in-use")),
                                 ("allowed_warning", "0.91", "0.4", "allowed", "false"),
                                 (path, stream))
                self.assertTrue(int(headers["anthropic-ratelimit-unified-5h-reset"]) > time.time())
        body = self.usage(p)
        self.assertEqual(body["status"], "allowed_warning")
        self.assertEqual(body["windows"]["five_hour"]["utilization"], 0.91)
        self.assertEqual(body["windows"]["seven_day"]["status"], "allowed")
        self.assertLessEqual(abs(body["updated_at"] - time.time()), 60)
        self.assertEqual({k: v for k, v in body["totals"].items() if k != "since"}, {
            "requests": 7, "input_tokens": 7 * 12, "output_tokens": 7 * 9,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
            "api_equivalent_usd": round(7 * 0.000228, 6)})
        self.assertLessEqual(body["totals"]["since"], time.time())
        # A tool call's turn counts as answered (its CLI is ended before it prints a result).
        status, _, _ = p.chat('[[fake:call:get_weather:{"city": "Oslo"}]]', tools=self.WEATHER)
        self.assertEqual((status, self.usage(p)["totals"]["requests"]), (200, 8))

    def test_a_stream_s_headers_carry_what_was_known_when_it_began(self):
        p = self.start_proxy()
        self.report(**self.warning())
        status, response, _ = p.stream("first")
        self.assertEqual((status, self.unified(response)), (200, {}))
        self.assertEqual(self.usage(p)["windows"]["five_hour"]["utilization"], 0.91,
                         "learnt from its own event, after its headers went")
        self.report(**self.warning(five_hour=0.95))
        status, response, _ = p.stream("second")
        self.assertEqual(self.unified(response)["anthropic-ratelimit-unified-5h-utilization"],
                         "0.91")
        self.assertEqual(self.usage(p)["windows"]["five_hour"]["utilization"], 0.95)

    def test_the_reserve_refuses_at_once_and_serves_again_after_the_reset(self):
        p = self.start_proxy(reserve=10)
        self.report(**self.warning(resets_in=3))
        self.assertEqual(p.chat("learns the state")[0], 200)
        runs = len(self.runs())
        for path, make in self.DIALECTS.items():
            for stream in (False, True):
                status, response, body = p.request("POST", path, make("hi", stream=stream))
                self.assertEqual(status, 429, (path, stream))
                self.assertTrue(1 <= int(response.getheader("Retry-After")) <= 3)
                if path == "/v1/messages":
                    self.assertEqual(body["error"]["type"], "rate_limit_error")
                else:
                    self.assertEqual(body["error"]["code"], "usage_reserve")
                message = body["error"]["message"]
                self.assertIn("5-hour", message)
                self.assertIn("91%", message)
                self.assertIn("--reserve 10", message)
        self.assertEqual(len(self.runs()), runs, "no CLI ran for a refused request")
        self.assertEqual(self.usage(p)["reserve_percent"], 10)
        # The window resets (3 s): served again, whatever the old utilization said.
        wait_until(lambda: p.chat("after the reset")[0] == 200, timeout=15,
                   what="the window to reset")

    def test_extra_usage_is_refused_unless_allowed_and_the_refusal_survives_a_restart(self):
        p = self.start_proxy()
        now = int(time.time())
        self.report(status="rejected", rateLimitType="five_hour", overageStatus="allowed",
                    isUsingOverage=True, unifiedWindows={
                        "five_hour": {"utilization": 1, "resetsAt": now + 600},
                        "seven_day": {"utilization": 0.5, "resetsAt": now + 86400}})
        with self.assertLogs("claude_max_proxy", "WARNING") as logs:
            status, response, body = p.chat("billed as extra usage, and answered")
        self.assertEqual(status, 200, body)
        self.assertIn("extra usage", "\n".join(logs.output))
        self.assertEqual(self.unified(response)["anthropic-ratelimit-unified-overage-in-use"],
                         "true")
        runs = len(self.runs())
        for path, make in self.DIALECTS.items():
            status, response, body = p.request("POST", path, make("hi"))
            self.assertEqual(status, 429, path)
            self.assertTrue(590 <= int(response.getheader("Retry-After")) <= 600)
            self.assertIn("--allow-extra-usage", body["error"]["message"])
            if path != "/v1/messages":
                self.assertEqual(body["error"]["code"], "extra_usage")
        self.assertEqual(len(self.runs()), runs)
        self.assertEqual(self.usage(p)["overage"], {"status": "allowed", "in_use": True})
        p.close()
        again = self.start_proxy()  # the state was kept: still refused
        self.assertEqual(again.chat("hi")[0], 429)
        self.assertEqual(self.usage(again)["status"], "rejected")
        allowed = self.start_proxy(allow_extra_usage=True)  # (it knew: no new warning)
        self.assertEqual(allowed.chat("hi")[0], 200)

    def test_the_api_s_subscription_refusals_are_400_extra_usage_required(self):
        p = self.start_proxy()
        for directive in ("[[fake:third_party]]", "[[fake:long_context]]"):
            for path, make in self.DIALECTS.items():
                status, _, body = p.request("POST", path, make(directive))
                self.assertEqual(status, 400, (directive, path))
                message = body["error"]["message"]
                self.assertNotIn("API Error", message)
                self.assertIn("extra usage", message)
                self.assertIn("claude.ai settings", message)
                if path == "/v1/messages":
                    self.assertEqual(body["error"]["type"], "invalid_request_error")
                else:
                    self.assertEqual(body["error"]["code"], "extra_usage_required")

    def test_health_tells_the_login_and_never_waits_for_it(self):
        p = self.start_proxy()
        cases = [({}, "ok", True, "oauth_token"),
                 ({"ANTHROPIC_API_KEY": "sk-ant-x"}, "ok", True, "api_key"),
                 ({"CLAUDE_CODE_OAUTH_TOKEN": ""}, "not_logged_in", False, "none")]
        for env, status, logged_in, method in cases:
            with mock.patch.dict(os.environ, env):
                p.server.login.check()
            code, _, body = p.request("GET", "/health")
            self.assertEqual((code, body["status"], body["claude"]["logged_in"],
                              body["claude"]["auth_method"]), (200, status, logged_in, method))
            self.assertEqual("warning" in body, method == "api_key", body)
            if not logged_in:
                self.assertIn("claude auth login", body["reason"])
        # A check that takes long: /health answers meanwhile, with what it last knew.
        with mock.patch.dict(os.environ, {"FAKE_CLAUDE_AUTH_DELAY": "30"}):
            p.server.login._asked -= proxy.LOGIN_CHECK_INTERVAL
            self.assertEqual(p.request("GET", "/health")[2]["status"], "not_logged_in")
            self.assertTrue(p.server.login._checking, "a check runs in the background")
            self.assertEqual(p.request("GET", "/health")[2]["claude"]["auth_method"], "none")


class StatusCommandTest(FakeClaudeMixin, unittest.TestCase):
    """`python3 claude_max_proxy.py status`, run as a user runs it, against a live daemon."""

    def setUp(self):
        super().setUp()
        self.p = self.start_proxy(api_keys=["status-key"])
        self.p.server.login.check()
        now = int(time.time())
        with open(os.path.join(self.log_dir, "unified.info"), "w") as f:
            json.dump({"status": "allowed_warning", "rateLimitType": "five_hour",
                       "overageStatus": "allowed", "isUsingOverage": False, "unifiedWindows": {
                           "five_hour": {"utilization": 0.91, "resetsAt": now + 6720,
                                         "status": "allowed_warning"},
                           "seven_day": {"utilization": 0.4, "resetsAt": now + 86400 * 3}}}, f)
        status, _, body = self.p.request("POST", "/v1/chat/completions", chat_body("hi"),
                                         headers={"Authorization": "Bearer status-key"})
        self.assertEqual(status, 200, body)

    def status(self, *args, key="status-key", port=None, terminal=False, **env):
        """(exit code, stdout, stderr) of `status` as a subprocess; `terminal`: in a pty."""
        command = [sys.executable, os.path.join(HERE, "claude_max_proxy.py"), "status",
                   "--port", str(port or self.p.port)] + list(args)
        environment = dict(os.environ, CLAUDE_MAX_API_KEY=key, **env)
        if not terminal:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30,
                                  env=environment)
            return done.returncode, done.stdout, done.stderr
        import pty
        leader, follower = pty.openpty()
        try:
            done = subprocess.run(command, stdout=follower, stderr=subprocess.PIPE, timeout=30,
                                  env=environment)
            os.close(follower)
            follower = None
            output = b""
            while True:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # EIO: the writing side is closed and all was read
                    break
                if not chunk:
                    break
                output += chunk
        finally:
            os.close(leader)
            if follower is not None:
                os.close(follower)
        return done.returncode, output.decode().replace("\r\n", "\n"), done.stderr.decode()

    def test_one_screen_plain_when_piped_in_colour_in_a_terminal(self):
        code, out, err = self.status()
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertRegex(lines[0], r"^claude-max-proxy on 127\.0\.0\.1:\d+ · logged in "
                                   r"\(oauth_token\) · up \d+m$")
        self.assertRegex(lines[1], r"^5-hour  \[#{18}-{2}\]  91%  resets \d\d:\d\d \(in 1h 5\dm\)"
                                   r"  warning$")
        self.assertRegex(lines[2], r"^weekly  \[#{8}-{12}\]  40%  resets \w{3} \d\d:\d\d "
                                   r"\(in (2d 23h|3d 0h)\)$")
        self.assertIn("extra usage  allowed on the account; refused by this proxy", out)
        self.assertIn("since start  1 request · 12 in / 9 out tokens", out)
        self.assertNotIn("\x1b", out)
        code, out, _ = self.status(terminal=True)
        self.assertEqual(code, 0)
        self.assertIn("\x1b[31m" + "█" * 18, out)
        code, out, _ = self.status(terminal=True, NO_COLOR="1")
        self.assertNotIn("\x1b", out)
        self.assertIn("[##################--]  91%", out)

    def test_json_is_the_daemon_s_usage_as_it_is(self):
        code, out, err = self.status("--json")
        self.assertEqual((code, err), (0, ""))
        _, _, usage = self.p.request("GET", "/v1/usage",
                                     headers={"Authorization": "Bearer status-key"})
        self.assertEqual(json.loads(out), usage)

    def test_no_daemon_or_a_refused_key_is_one_line_and_exit_1(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]
        for port, key, words in ((free, "status-key", "nothing listens on 127.0.0.1:%d" % free),
                                 (None, "wrong", "refused the key"),
                                 (None, "", "refused the key")):
            code, out, err = self.status(port=port, key=key)
            self.assertEqual((code, out), (1, ""), err)
            self.assertEqual(len(err.splitlines()), 1, err)
            self.assertIn(words, err)
            self.assertNotIn("Traceback", err)
        self.assertIn("python3 claude_max_proxy.py", self.status(port=free)[2])
        self.assertIn("CLAUDE_MAX_API_KEY", self.status(key="wrong")[2])


class StatusPageTest(FakeClaudeMixin, unittest.TestCase):
    """GET / for a browser: the same content as `status`, and the last requests."""

    HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}

    def test_a_browser_gets_the_page_a_client_asking_json_what_it_got_before(self):
        p = self.start_proxy()
        status, response, page = p.request("GET", "/", headers=self.HTML)
        self.assertEqual(status, 200)
        self.assertEqual(response.getheader("Content-Type"), "text/html; charset=utf-8")
        self.assertEqual(response.getheader("Cache-Control"), "no-store")
        self.assertIn("default-src 'none'", response.getheader("Content-Security-Policy"))
        self.assertTrue(page.startswith(b"<!DOCTYPE html>"))
        for headers in ({}, {"Accept": "application/json"}):
            status, response, body = p.request("GET", "/", headers=headers)
            self.assertEqual((status, body["error"]["code"]), (404, "unknown_url"))
        status, response, body = p.request("HEAD", "/", headers=self.HTML)
        self.assertEqual((status, body), (200, b""))
        # The same Host and Origin rules as the API.
        self.assertEqual(p.request("GET", "/", headers=dict(self.HTML, Host="evil.example"))[0],
                         403)
        self.assertEqual(p.request("GET", "/", headers=dict(
            self.HTML, Origin="https://evil.example"))[0], 403)
        self.assertEqual(p.request("GET", "/", headers=dict(
            self.HTML, **{"Sec-Fetch-Site": "cross-site"}))[0], 403)

    def test_with_a_key_a_browser_logs_in_with_basic_auth(self):
        p = self.start_proxy(api_keys=["page-key"])
        status, response, _ = p.request("GET", "/", headers=self.HTML)
        self.assertEqual((status, response.getheader("WWW-Authenticate")),
                         (401, 'Basic realm="claude-max-proxy"'))
        for authorization, expected in (
                ("Basic " + base64.b64encode(b"anyone:page-key").decode(), 200),
                ("Basic " + base64.b64encode(b":page-key").decode(), 200),
                ("Bearer page-key", 200),
                ("Basic " + base64.b64encode(b"page-key:wrong").decode(), 401),
                ("Basic " + base64.b64encode(b"page-key").decode(), 401),
                ("Basic !!notbase64", 401)):
            status, _, page = p.request("GET", "/", headers=dict(
                self.HTML, Authorization=authorization))
            self.assertEqual(status, expected, authorization)
            if status == 200:
                self.assertNotIn(b"page-key", page, "the key is never in the page")
        # Basic auth is for the page: the API still wants the key as such.
        status, _, _ = p.request("POST", "/v1/chat/completions", chat_body("hi"), headers={
            "Authorization": "Basic " + base64.b64encode(b"x:page-key").decode()})
        self.assertEqual(status, 401)

    def test_the_last_fifty_requests_without_their_text(self):
        p = self.start_proxy(reserve=10)
        for n in range(53):
            self.assertEqual(p.chat("SECRET-PROMPT-%d" % n, model="<b>sonnet</b>" if n == 52
                                    else "sonnet")[0], 404 if n == 52 else 200)
        status, _, body = p.request("POST", "/v1/messages", {"model": "sonnet", "max_tokens": 5,
                                                             "messages": []})
        self.assertEqual(status, 400)
        # (an entry is added just after its answer went out)
        wait_until(lambda: p.server.requests.entries()[-1]["status"] == 400,
                   what="the last request in the log")
        page = p.request("GET", "/", headers=self.HTML)[2].decode()
        rows = re.findall(r"<tr><td>\d\d:\d\d:\d\d</td>(.*?)</tr>", page)
        self.assertEqual(len(rows), proxy.REQUEST_LOG_SIZE)
        self.assertIn("<td>messages</td><td>sonnet</td>", rows[0], "newest first")
        self.assertIn("400 invalid_value", rows[0])
        self.assertIn("&lt;b&gt;sonnet&lt;/b&gt;", rows[1])
        self.assertIn("404 model_not_found", rows[1])
        self.assertIn("<td class=num>12</td><td class=num>9</td>", rows[2])
        self.assertNotIn("SECRET-PROMPT", page)
        self.assertNotIn("Hello from the fake API", page)
        self.assertIn("reserve", page)


    def test_the_log_keeps_the_order_requests_came_in(self):
        """Each is added as it ends: a long stream ends after the short requests that came
        while it ran, and an answer's entry can come after the next request's (CI saw it)."""
        log = proxy.RequestLog(3)
        for at in (10.0, 12.0, 11.0, 13.0, 9.0, 14.0):
            log.add({"at": at})
        self.assertEqual([e["at"] for e in log.entries()], [12.0, 13.0, 14.0])
        log.add({"at": 13.5})
        self.assertEqual([e["at"] for e in log.entries()], [13.0, 13.5, 14.0])


@unittest.skipUnless(shutil.which("chromium") or REQUIRE_ALL, "Debian's chromium is not "
                     "installed (apt-get install chromium)")
class BrowserTest(FakeClaudeMixin, unittest.TestCase):
    """The status page as a person sees it: rendered by a real headless Chromium."""

    def dump_dom(self, url):
        browser = shutil.which("chromium")
        if not browser:
            raise AssertionError("PROXY_REQUIRE_ALL=1 but chromium is not installed")
        profile = tempfile.mkdtemp(prefix="proxy-chromium-")
        self.addCleanup(shutil.rmtree, profile, True)
        done = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--user-data-dir=" + profile, "--dump-dom", url],
            capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
        self.assertEqual(done.returncode, 0, done.stderr[-2000:])
        return done.stdout.decode()

    def test_the_page_in_a_headless_browser(self):
        p = self.start_proxy()
        p.server.login.check()  # (as the daemon does at start)
        now = int(time.time())
        with open(os.path.join(self.log_dir, "unified.info"), "w") as f:
            json.dump({"status": "allowed_warning", "isUsingOverage": False, "unifiedWindows": {
                "five_hour": {"utilization": 0.91, "resetsAt": now + 6720},
                "seven_day": {"utilization": 0.4, "resetsAt": now + 86400 * 3}}}, f)
        self.assertEqual(p.chat("hi", model="opus")[0], 200)
        self.assertEqual(p.request("POST", "/v1/responses", {"model": "haiku", "input": "hi"})[0],
                         200)
        dom = self.dump_dom("http://127.0.0.1:%d/" % p.port)
        self.assertIn("<title>claude-max-proxy</title>", dom)
        usage = re.findall(r"<th>(5-hour|weekly)</th>.*?<td class=\"num\">(\d+%)</td>", dom,
                           re.S)
        self.assertEqual(usage, [("5-hour", "91%"), ("weekly", "40%")])
        rows = re.findall(r"<td>(chat|responses)</td><td>(\w+)</td>", dom)
        self.assertEqual(rows, [("responses", "haiku"), ("chat", "opus")])
        self.assertIn("logged in (oauth_token)", dom)


class RequestLogTest(FakeClaudeMixin, unittest.TestCase):
    """The daemon's log line per request says what happened, in the client's terms."""

    def logged(self, p, send, count=1):
        """The log lines of the requests `send()` makes (each is written after its answer)."""
        with self.assertLogs("claude_max_proxy", "INFO") as logs:
            send()
            wait_until(lambda: len([line for line in logs.output if " id=" in line]) >= count,
                       what="the request's log line")
        return [line for line in logs.output if " id=" in line]

    def test_the_path_is_the_one_the_client_sent(self):
        p = self.start_proxy()
        line, = self.logged(p, lambda: p.chat("hi"))
        self.assertIn("POST /v1/chat/completions 200 ", line)
        lines = self.logged(p, lambda: (p.request("GET", "/health"), p.request("GET", "/models")),
                            2)
        self.assertIn("GET /health 200 ", lines[0])
        self.assertIn("GET /models 200 ", lines[1])
        for path in ("/v1/nope", "/nope", "/v1/v1/models"):
            status, _, body = p.request("GET", path)
            self.assertEqual(status, 404)
            self.assertIn("Unknown path %r" % path, body["error"]["message"])
        status, _, body = p.request("GET", "/v1/chat/completions")
        self.assertEqual(status, 405)
        self.assertIn("GET is not allowed on /v1/chat/completions", body["error"]["message"])

    def test_how_the_cli_ended_in_words(self):
        """Not `cli_exit=143` for every run the daemon ended itself (SIGTERM after a tool call,
        a stop sequence): finished, stopped by the daemon, killed by a signal, an exit code."""
        p = self.start_proxy(warm=0)
        weather = [{"type": "function", "function": {"name": "get_weather"}}]
        cases = [("hi", {}, 200, "cli=finished"),
                 ('[[fake:call:get_weather:{"city": "Oslo"}]]', {"tools": weather}, 200,
                  "cli=stopped"),
                 ("one two [[fake:reply:one two three]]", {"stop": ["two"]}, 200, "cli=stopped"),
                 ("[[fake:exit:7]]", {}, 502, "cli=exit:7"),
                 ("[[fake:err529]]", {}, 503, "cli=exit:1")]
        for content, fields, status, word in cases:
            line, = self.logged(p, lambda: self.assertEqual(
                p.chat(content, **fields)[0], status, content))
            self.assertIn(" %s " % word, line, content)
            self.assertNotIn("cli_exit", line)
        open(os.path.join(self.log_dir, "die-on-line"), "w").close()  # killed by someone else
        line, = self.logged(p, lambda: self.assertEqual(p.chat("hi")[0], 502))
        self.assertIn(" cli=signal:SIGKILL ", line)


class LoadTest(FakeClaudeMixin, unittest.TestCase):
    """What load it holds: CLI processes capped, a fair and bounded queue, bodies and clients."""

    def gated(self, p, name, **fields):
        """A chat request whose CLI answers only once open_gate(name) is called."""
        return send_chat(p.port, chat_body("[[fake:gate:%s]] %s" % (name, name), **fields))

    def open_gate(self, name):
        open(os.path.join(self.log_dir, name), "w").close()

    def prompts(self):
        return [run["stdin"][0]["message"]["content"].split()[-1] for run in self.runs()]

    def test_cli_processes_are_capped_and_requests_wait_in_arrival_order(self):
        p = self.start_proxy(max_concurrency=2)
        sockets = {}
        for i, name in enumerate("AB"):
            sockets[name] = self.gated(p, name)
            wait_until(lambda: len(self.runs()) == i + 1, what=name + "'s CLI")
        for i, name in enumerate("CDE"):
            sockets[name] = self.gated(p, name)
            wait_until(lambda: p.server.slots.queued == i + 1, what=name + " to wait")
        self.assertEqual(sorted(self.prompts()), ["A", "B"])
        for release, starts in (("A", "C"), ("C", "D"), ("B", "E")):
            self.open_gate(release)
            self.assertEqual(read_response(sockets.pop(release))[0], 200)
            wait_until(lambda: self.prompts()[-1:] == [starts], what=starts + " to start")
        for name in "DE":
            self.open_gate(name)
            self.assertEqual(read_response(sockets.pop(name))[0], 200)
        self.assertEqual(self.prompts(), list("ABCDE"))
        self.assertLessEqual(max(len(run["peers"]) for run in self.runs()), 1,
                             "never more than two CLIs at once")
        self.assert_no_cli_left(p)

    def test_a_slow_queue_is_429_with_retry_after(self):
        p = self.start_proxy(max_concurrency=1, queue_timeout=0.3)
        held = self.gated(p, "A")
        wait_until(lambda: self.runs(), what="the first CLI")
        status, response, body = p.chat("B")
        self.assertEqual((status, body["error"]["code"]), (429, "queue_timeout"))
        self.assertEqual(response.getheader("Retry-After"), str(proxy.QUEUE_RETRY_AFTER))
        self.open_gate("A")
        self.assertEqual(read_response(held)[0], 200)
        self.assertEqual(self.prompts(), ["A"], "no CLI for the refused request")

    def test_a_full_queue_is_429_at_once(self):
        p = self.start_proxy(max_concurrency=1, max_queue=1)
        held = self.gated(p, "A")
        wait_until(lambda: self.runs(), what="A's CLI")
        queued = self.gated(p, "B")
        wait_until(lambda: p.server.slots.queued == 1, what="B to wait")
        status, response, body = p.chat("C")
        self.assertEqual((status, body["error"]["code"]), (429, "queue_full"))
        self.assertEqual(body["error"]["type"], "rate_limit_error")
        self.assertEqual(response.getheader("Retry-After"), str(proxy.QUEUE_RETRY_AFTER))
        for name, sock in (("A", held), ("B", queued)):
            self.open_gate(name)
            self.assertEqual(read_response(sock)[0], 200)
        self.assertEqual(self.prompts(), ["A", "B"])

    def test_health_and_models_never_wait(self):
        p = self.start_proxy(max_concurrency=1)
        held = self.gated(p, "A")
        wait_until(lambda: self.runs(), what="A's CLI")
        queued = self.gated(p, "B")
        wait_until(lambda: p.server.slots.queued == 1, what="B to wait")
        status, _, body = p.request("GET", "/health")
        self.assertEqual((status, body["requests_in_flight"], body["requests_waiting"],
                          body["max_concurrency"]), (200, 1, 1, 1))
        self.assertEqual(p.request("GET", "/v1/models")[0], 200)
        self.assertEqual(p.request("GET", "/v1/models/opus")[0], 200)
        for name, sock in (("A", held), ("B", queued)):
            self.open_gate(name)
            self.assertEqual(read_response(sock)[0], 200)

    def test_bodies_over_the_limit_are_refused_unread(self):
        p = self.start_proxy(max_body=1024 * 1024)
        with socket.create_connection(("127.0.0.1", p.port), timeout=30) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                      b"application/json\r\nContent-Length: 104857600\r\n\r\n{")
            status, response, body = read_response(s)  # answered with the body never sent
        self.assertEqual((status, body["error"]["code"]), (413, "request_too_large"))
        self.assertEqual(response.getheader("Connection"), "close")
        # A client that sends its whole (too big) body before reading still gets the 413.
        conn = p.connect()
        conn.request("POST", "/v1/chat/completions", body=b" " * (24 * 1024 * 1024),
                     headers={"Content-Type": "application/json"})
        self.assertEqual(conn.getresponse().status, 413)
        conn.close()
        # `Expect: 100-continue`: no "100 Continue" for a body that will be refused, one for a
        # body that will be read.
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                b"application/json\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n")
        with socket.create_connection(("127.0.0.1", p.port), timeout=30) as s:
            s.sendall(head % 2000000)
            self.assertTrue(s.makefile("rb").readline().startswith(b"HTTP/1.1 413 "))
        body = json.dumps(chat_body()).encode()
        with socket.create_connection(("127.0.0.1", p.port), timeout=30) as s:
            s.sendall(head % len(body))
            reader = s.makefile("rb")
            self.assertEqual(reader.readline(), b"HTTP/1.1 100 Continue\r\n")
            self.assertEqual(reader.readline(), b"\r\n")
            s.sendall(body)
            self.assertTrue(reader.readline().startswith(b"HTTP/1.1 200 "))
            reader.close()
        self.assertEqual(p.chat()[0], 200)

    def test_body_framing_must_be_clear(self):
        p = self.start_proxy()
        json_type = ("Content-Type", "application/json")
        for headers, status, code in [
                ((), 411, "length_required"),
                ((("Content-Length", "x"),), 400, "invalid_content_length"),
                ((("Content-Length", "-1"),), 400, "invalid_content_length"),
                ((("Content-Length", "1, 1"),), 400, "invalid_content_length"),
                ((("Content-Length", "\u00b2"),), 400, "invalid_content_length"),  # "2" to isdigit
                ((("Content-Length", "2"), ("Content-Length", "2")), 400,
                 "invalid_content_length"),
                ((("Transfer-Encoding", "chunked"),), 411, "length_required"),
                ((("Transfer-Encoding", "chunked"), ("Content-Length", "2")), 411,
                 "length_required")]:
            got, response, body = raw_request(
                p.port, "POST", "/v1/chat/completions",
                headers=(("Host", "127.0.0.1"), json_type) + headers, body=b"2\r\n{}\r\n0\r\n\r\n")
            self.assertEqual((got, body["error"]["code"]), (status, code), headers)
            self.assertEqual(response.getheader("Connection"), "close", headers)
        with socket.create_connection(("127.0.0.1", p.port), timeout=30) as s:  # body cut short
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                      b"application/json\r\nContent-Length: 100\r\n\r\n{\"model\"")
            s.shutdown(socket.SHUT_WR)
            self.assertEqual(read_response(s)[0], 400)
        # A GET with a body: the body is not taken for a next request on the connection.
        status, response, _ = raw_request(p.port, headers=(
            ("Host", "127.0.0.1"), ("Content-Length", "40")),
            body=b"DELETE /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual((status, response.getheader("Connection")), (200, "close"))
        self.assertEqual(self.runs(), [])

    def test_slow_and_silent_clients_are_dropped(self):
        p = self.start_proxy(client_timeout=0.3)
        p.chat()
        before = open_fds()
        runs = len(self.runs())
        for sent in (b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"):
            with socket.create_connection(("127.0.0.1", p.port), timeout=30) as s:
                s.sendall(sent)
                self.assertEqual(s.recv(100), b"", "the server closes a silent connection")
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                b"application/json\r\nContent-Length: 1000\r\n\r\n")
        with socket.create_connection(("127.0.0.1", p.port), timeout=30) as s:
            s.sendall(head + b"{")
            status, _, body = read_response(s)
            self.assertEqual((status, body["error"]["code"]), (408, "request_timeout"))
        with socket.create_connection(("127.0.0.1", p.port), timeout=30) as s:
            s.sendall(head)
            answer = []
            reader = threading.Thread(target=lambda: answer.append(read_response(s)))
            reader.start()
            try:  # never silent for long, but never done either: the whole body has a deadline
                while reader.is_alive():
                    s.sendall(b" ")
                    reader.join(0.05)
            except OSError:
                pass
            reader.join()
            self.assertEqual(answer[0][0], 408)
        self.assertEqual(len(self.runs()), runs, "no CLI for a request that never arrived")
        if before is not None:
            wait_until(lambda: open_fds() <= before, what="descriptors to return to %d" % before)
        self.assertEqual(p.chat()[0], 200)

    def test_connections_past_the_cap_get_503(self):
        p = self.start_proxy()
        with mock.patch.object(proxy, "MAX_CONNECTIONS", 3):
            idle = [socket.create_connection(("127.0.0.1", p.port)) for _ in range(3)]
            wait_until(lambda: p.server.connections == 3, what="3 connections")
            status, response, body = raw_request(p.port)
            self.assertEqual((status, body["error"]["code"]), (503, "too_many_connections"))
            idle.pop().close()
            wait_until(lambda: p.server.connections == 2, what="a connection to close")
            self.assertEqual(raw_request(p.port)[0], 200)
            for s in idle:
                s.close()
            wait_until(lambda: p.server.connections == 0, what="all connections to close")


class RetryTest(FakeClaudeMixin, unittest.TestCase):
    """An authentication failure while other CLIs start is retried once."""

    def hold_one(self, p):
        sock = send_chat(p.port, chat_body("[[fake:gate:held]]"))
        wait_until(lambda: self.runs(), what="the first CLI")
        return sock

    def release(self, sock):
        open(os.path.join(self.log_dir, "held"), "w").close()
        self.assertEqual(read_response(sock)[0], 200)

    def test_an_auth_failure_beside_another_cli_is_retried_once(self):
        p = self.start_proxy()
        held = self.hold_one(p)
        status, _, body = p.chat("[[fake:err401once]]")
        self.assertEqual((status, body["choices"][0]["message"]["content"]),
                         (200, "Hello from the fake API."))
        self.assertEqual(len(self.runs()), 3, "the held CLI, the failed one and its retry")
        os.unlink(os.path.join(self.log_dir, "auth-refreshed"))
        status, _, events = p.stream("[[fake:err401once]]")
        self.assertEqual((status, events[-1]), (200, "[DONE]"))
        self.release(held)
        self.assert_no_cli_left(p)

    def test_a_lone_auth_failure_is_reported_at_once(self):
        p = self.start_proxy()
        status, _, body = p.chat("[[fake:err401once]]")
        self.assertEqual((status, body["error"]["code"]), (401, "claude_not_logged_in"))
        self.assertEqual(len(self.runs()), 1)

    def test_a_second_auth_failure_is_reported(self):
        p = self.start_proxy()
        held = self.hold_one(p)
        status, _, body = p.chat("[[fake:err401]]")
        self.assertEqual((status, body["error"]["code"]), (401, "claude_not_logged_in"))
        self.assertEqual(len(self.runs()), 3, "one retry, not more")
        self.release(held)


class AccessTest(FakeClaudeMixin, unittest.TestCase):
    """Who may use it: callers with a key, pages from allowed origins, requests to this host."""

    CHAT = json.dumps(chat_body()).encode()

    def test_keys_are_required_everywhere_but_health(self):
        p = self.start_proxy(api_keys=["key-one", "key-two"])
        for method, path in [("GET", "/v1/models"), ("GET", "/v1/models/opus"), ("GET", "/models"),
                             ("POST", "/v1/chat/completions"), ("GET", "/v1/nowhere"),
                             ("DELETE", "/v1/models")]:
            for headers, says in [({}, "needs an API key"),
                                  ({"Authorization": "Bearer key-three"}, "Incorrect"),
                                  ({"x-api-key": "key-one "[:-2]}, "Incorrect"),
                                  ({"Authorization": "Basic a2V5LW9uZQ=="}, "Incorrect"),
                                  ({"Authorization": "Bearer"}, "Incorrect")]:
                status, response, body = p.request(method, path, headers=headers, raw=self.CHAT)
                self.assertEqual(status, 401, (method, path, headers))
                self.assertEqual(set(body["error"]), {"message", "type", "param", "code"})
                self.assertEqual(body["error"]["code"], "invalid_api_key")
                self.assertIn(says, body["error"]["message"])
                self.assertEqual(response.getheader("WWW-Authenticate"),
                                 'Bearer realm="claude-max-proxy"')
        self.assertEqual(self.runs(), [], "no CLI runs for a caller without the key")
        for headers in ({"Authorization": "Bearer key-one"}, {"authorization": "bearer  key-two "},
                        {"x-api-key": "key-two"}):
            self.assertEqual(p.request("GET", "/v1/models", headers=headers)[0], 200, headers)
        status, _, body = p.request("POST", "/v1/chat/completions", raw=self.CHAT,
                                    headers={"Authorization": "Bearer key-two"})
        self.assertEqual((status, body["choices"][0]["message"]["content"]),
                         (200, "Hello from the fake API."))
        # /health is open, but only a caller with a key learns where the CLI is installed.
        status, _, body = p.request("GET", "/health")
        self.assertEqual((status, body["status"], body["claude"]["version"]),
                         (200, "ok", "2.1.331 (Claude Code)"))
        self.assertNotIn(self.fake_path, json.dumps(body))
        _, _, body = p.request("GET", "/health", headers={"x-api-key": "key-one"})
        self.assertEqual(body["claude"]["path"], self.fake_path)

    def test_every_key_is_compared_in_constant_time(self):
        p = self.start_proxy(api_keys=["a" * 64, "b", "c" * 3])
        for key, status in (("b", 200), ("a", 401), ("", 401)):
            with mock.patch.object(proxy.hmac, "compare_digest",
                                   wraps=proxy.hmac.compare_digest) as compare:
                got, _, _ = p.request("GET", "/v1/models", headers={"x-api-key": key} if key
                                      else {"Authorization": "Bearer x"})
            self.assertEqual(got, status, key)
            self.assertEqual(compare.call_count, 3, "every key is compared, even after a match")
            for (given, expected), _ in compare.call_args_list:
                self.assertEqual(len(given), len(expected), "digests of equal length")

    def test_keys_come_from_the_flag_the_environment_or_a_file(self):
        clean = {k: "" for k in os.environ if k.startswith("CLAUDE_MAX_API")}
        with mock.patch.dict(os.environ, clean):
            self.assertEqual(proxy.parse_args(["--api-key", " k1, ,k2 "]).api_keys, ["k1", "k2"])
            self.assertEqual(proxy.parse_args([]).api_keys, [])
            with mock.patch.dict(os.environ, {"CLAUDE_MAX_API_KEY": "e1,e2"}):
                self.assertEqual(proxy.parse_args([]).api_keys, ["e1", "e2"])
            path = os.path.join(self.tmp, "keys")
            with open(path, "w") as f:
                f.write("f1\nf2, f3\n\n")
            self.assertEqual(proxy.parse_args(["--api-key", "k", "--api-key-file", path]).api_keys,
                             ["k", "f1", "f2", "f3"])
            for bad in (os.path.join(self.tmp, "missing"), os.devnull):
                with self.assertRaises(SystemExit), mock.patch("sys.stderr"):
                    proxy.parse_args(["--api-key-file", bad])

    def test_pages_from_other_origins_are_refused(self):
        p = self.start_proxy()
        for method, path, headers in [
                ("POST", "/v1/chat/completions", {"Origin": "https://evil.example"}),
                ("GET", "/v1/models", {"Origin": "null"}),
                ("GET", "/health", {"Origin": "http://127.0.0.1:%d" % p.port}),
                ("OPTIONS", "/v1/chat/completions", {
                    "Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "content-type"}),
                ("GET", "/v1/models", {"Sec-Fetch-Site": "cross-site",
                                       "Sec-Fetch-Mode": "no-cors"})]:
            status, response, body = p.request(method, path, headers=headers,
                                               raw=self.CHAT if method == "POST" else None)
            self.assertEqual((status, body["error"]["code"]), (403, "origin_not_allowed"), headers)
            cors = [h for h in response.headers if h.lower().startswith("access-control")]
            self.assertEqual(cors, [], "a refused origin gets no CORS headers")
        # A form post, which a page may send anywhere without asking: not JSON, so refused.
        status, _, _ = p.request("POST", "/v1/chat/completions", raw=b"model=opus",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
        self.assertEqual(status, 415)
        self.assertEqual(self.runs(), [])

    def test_allowed_origins_get_cors_and_preflight(self):
        origin = "http://localhost:3000"
        p = self.start_proxy(cors_origins=["HTTP://LocalHost:3000/"], api_keys=["k"])
        status, response, _ = p.request("OPTIONS", "/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
            "Access-Control-Request-Private-Network": "true"})
        self.assertEqual(status, 204)  # no key needed: browsers send none with a preflight
        self.assertEqual(response.getheader("Access-Control-Allow-Origin"), origin)
        self.assertEqual(response.getheader("Access-Control-Allow-Methods"), "POST")
        self.assertEqual(response.getheader("Access-Control-Allow-Headers"),
                         "authorization, content-type, x-stainless-os")
        self.assertEqual(response.getheader("Access-Control-Allow-Private-Network"), "true")
        self.assertGreater(int(response.getheader("Access-Control-Max-Age")), 0)
        self.assertIn("Origin", response.getheader("Vary"))
        _, response, _ = p.request("OPTIONS", "/v1/models", headers={
            "Origin": origin, "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "x-ok, not a header name"})
        self.assertEqual(response.getheader("Access-Control-Allow-Methods"), "GET, HEAD")
        self.assertIsNone(response.getheader("Access-Control-Allow-Headers"))
        # The requests themselves: the key is still needed, and every answer is readable.
        for headers, expected in (({"Origin": origin}, 401),
                                  ({"Origin": origin, "Authorization": "Bearer k"}, 200)):
            status, response, _ = p.request("POST", "/v1/chat/completions", raw=self.CHAT,
                                            headers=headers)
            self.assertEqual(status, expected)
            self.assertEqual(response.getheader("Access-Control-Allow-Origin"), origin)
            self.assertIn("X-Request-Id", response.getheader("Access-Control-Expose-Headers"))
        stream = json.dumps(chat_body(stream=True)).encode()
        status, response, body = raw_request(p.port, "POST", "/v1/chat/completions", headers=(
            ("Host", "localhost"), ("Origin", origin), ("Authorization", "Bearer k"),
            ("Content-Type", "application/json"), ("Content-Length", str(len(stream)))),
            body=stream)
        self.assertEqual((status, response.getheader("Access-Control-Allow-Origin")),
                         (200, origin))
        self.assertEqual(parse_sse(body)[-1], "[DONE]")

    def test_the_host_header_must_name_this_server(self):
        p = self.start_proxy(allowed_hosts=["proxy.lan"])
        port = p.port
        for host in ("127.0.0.1:%d" % port, "localhost:%d" % port, "LOCALHOST", "localhost.",
                     "[::1]:%d" % port, "127.5.6.7", "app.localhost:%d" % port,
                     "proxy.lan:%d" % port):
            self.assertEqual(raw_request(port, headers=[("Host", host)])[0], 200, host)
        for host in ("evil.example", "evil.example:%d" % port, "127.0.0.1.evil.example",
                     "localhost.evil.example", "192.168.1.10:%d" % port, "[::1", "[::1]x",
                     "127.0.0.1:http", "", "a b", "l\u00f6calhost"):
            status, _, body = raw_request(port, headers=[("Host", host)])
            self.assertEqual((status, body["error"]["code"]), (403, "host_not_allowed"), host)
        status, _, body = raw_request(p.port, "POST", "/v1/chat/completions", headers=(
            ("Host", "evil.example"), ("Content-Type", "application/json"),
            ("Content-Length", str(len(self.CHAT)))), body=self.CHAT)
        self.assertEqual(status, 403)
        self.assertEqual(self.runs(), [], "no CLI runs for a rebound name")
        for headers in ((), (("Host", "127.0.0.1"), ("Host", "evil.example"))):
            status, _, body = raw_request(port, headers=headers)
            self.assertEqual((status, body["error"]["code"]), (400, "invalid_host"), headers)
        self.assertEqual(raw_request(port, headers=(), version="HTTP/1.0")[0], 200)

    def test_host_names_pure(self):
        allowed = proxy.host_allowed
        self.assertTrue(allowed("192.168.1.10:3456", set(), any_address=True))
        self.assertTrue(allowed("[fe80::1%25en0]:3456", set(), any_address=True))
        self.assertFalse(allowed("evil.example", set(), any_address=True))
        self.assertFalse(allowed("192.168.1.10", set(), any_address=False))
        self.assertTrue(allowed("[::ffff:127.0.0.1]", set(), any_address=False))
        self.assertTrue(allowed("Proxy.Lan:80", {"proxy.lan"}, any_address=False))
        for name, loopback in (("127.0.0.1", True), ("localhost", True), ("::1", True),
                               ("0.0.0.0", False), ("", False), ("::", False),
                               ("localhost.evil", False), ("10.0.0.1", False)):
            self.assertEqual(proxy.listens_on_loopback_only(name), loopback, name)

    def test_access_pure(self):
        """What Access.check makes of a request's headers, without a server."""
        def headers(**fields):
            message = email.message.Message()
            for name, value in fields.items():
                message[name.replace("_", "-")] = value
            return message

        access = proxy.Access("127.0.0.1", ["proxy.lan"], ["HTTP://LocalHost:3000/"], ["k"])
        check = access.check
        self.assertEqual(check(headers(Host="127.0.0.1:3456"), False), (None, False))
        self.assertEqual(check(headers(Host="proxy.lan", Authorization="Bearer k"), False),
                         (None, True))
        self.assertEqual(check(headers(Host="localhost", Origin=" http://localhost:3000 ",
                                       x_api_key="k"), False), ("http://localhost:3000", True))
        self.assertEqual(check(headers(), True), (None, False))  # HTTP/1.0 may omit Host
        basic = "Basic " + base64.b64encode(b"anyone:k").decode()
        self.assertEqual(check(headers(Host="localhost", Authorization=basic), False, page=True),
                         (None, True))
        self.assertEqual(check(headers(Host="localhost", Authorization=basic), False),
                         (None, False), "a Basic password is the key only for the page")
        for fields, status, code in (
                ({}, 400, "invalid_host"),
                ({"Host": "evil.example"}, 403, "host_not_allowed"),
                ({"Host": "localhost", "Origin": "https://evil.example"}, 403,
                 "origin_not_allowed"),
                ({"Host": "localhost", "Sec_Fetch_Site": "cross-site"}, 403,
                 "origin_not_allowed")):
            with self.assertRaises(proxy.APIError) as caught:
                check(headers(**fields), False)
            self.assertEqual((caught.exception.status, caught.exception.code), (status, code))
        two = headers(Host="localhost")
        two["Host"] = "localhost"
        with self.assertRaises(proxy.APIError):
            check(two, False)
        open_access = proxy.Access("0.0.0.0")
        self.assertEqual(open_access.check(headers(Host="192.168.1.10:3456"), False),
                         (None, True), "no keys: everyone who gets in holds one")
        refusal = proxy.Access.refusal(headers(Authorization="Bearer wrong"))
        self.assertEqual((refusal.status, refusal.message), (401, "Incorrect API key provided."))
        self.assertIn("Basic", proxy.Access.refusal(headers(), page=True).headers[
            "WWW-Authenticate"])


class MainTest(FakeClaudeMixin, unittest.TestCase):
    def run_main(self, *args, env=None, timeout=20):
        return subprocess.run([sys.executable, os.path.join(HERE, "claude_max_proxy.py")]
                              + list(args), capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, **(env or {})))

    def test_version_and_help(self):
        out = self.run_main("--version")
        self.assertEqual((out.returncode, out.stdout.strip()), (0, "claude-max-api "
                                                                + proxy.__version__))
        out = self.run_main("--help")
        for flag in ("--host", "--port", "--claude-bin", "--timeout", "--idle-timeout",
                     "--log-level", "CLAUDE_MAX_API_PORT", "CLAUDE_BIN", "--api-key",
                     "CLAUDE_MAX_API_KEY", "--api-key-file", "--cors-origin", "--allowed-host",
                     "--max-concurrency", "--max-queue", "--queue-timeout", "--max-body",
                     "--client-timeout", "--shutdown-grace", "--warm", "CLAUDE_MAX_API_WARM",
                     "--warm-idle"):
            self.assertIn(flag, out.stdout)

    def test_run_as_a_script_it_runs_itself_by_runpy_in_the_same_process(self):
        """Else Python would keep the file's whole syntax tree (~12 MB) for the daemon's life."""
        daemon, port = start_daemon(self)
        if not os.path.isdir("/proc"):
            self.skipTest("no /proc to read the command line from")
        def argv():
            with open("/proc/%d/cmdline" % daemon.pid) as f:
                words = f.read().split("\0")
            return proxy.RUNPY_START in words and words

        argv = wait_until(argv, what="the runpy start")
        self.assertEqual(argv[argv.index(proxy.RUNPY_START) + 1:][:3],
                         [os.path.join(HERE, "claude_max_proxy.py"), "--port", "0"])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/health")
        self.assertEqual(conn.getresponse().status, 200)
        conn.close()
        daemon.send_signal(signal.SIGTERM)
        self.assertEqual(daemon.wait(30), 0, "the process that was started ends, and well")

    def test_bad_flags_are_one_line_and_nonzero(self):
        for args in (["--port", "x"], ["--timeout", "-1"], ["--nope"], ["--port", "70000"],
                     ["--log-level", "LOUD"], ["--max-concurrency", "0"], ["--max-queue", "x"],
                     ["--max-body", "12q"], ["--queue-timeout", "0"], ["--client-timeout", "-5"],
                     ["--api-key-file", "/nonexistent/keys"], ["--warm", "-1"],
                     ["--warm", "two"], ["--warm-idle", "0"]):
            out = self.run_main(*args)
            self.assertEqual(out.returncode, 2, args)
            self.assertEqual(len(out.stderr.strip().splitlines()), 1, out.stderr)
            self.assertIn("error", out.stderr)
        out = self.run_main(env={"CLAUDE_MAX_API_PORT": "abc"})
        self.assertEqual(out.returncode, 1)
        self.assertIn("CLAUDE_MAX_API_PORT", out.stderr)

    def test_listening_beyond_loopback_needs_a_key(self):
        for host in ("0.0.0.0", "::", ""):
            out = self.run_main("--host", host, "--port", "0",
                                env={"CLAUDE_MAX_API_KEY": "", "CLAUDE_MAX_API_KEY_FILE": ""})
            self.assertEqual(out.returncode, 1, host)
            self.assertEqual(len(out.stderr.strip().splitlines()), 1, out.stderr)
            self.assertIn("refusing to listen on %s without an API key" % (host or "*"),
                          out.stderr)
        # With a key it goes on to listen: shown here by a port that is taken, so that the test
        # never listens on a public address.
        with socket.socket() as taken:
            taken.bind(("0.0.0.0", 0))
            out = self.run_main("--host", "0.0.0.0", "--port", str(taken.getsockname()[1]),
                                "--api-key", "k")
        self.assertEqual(out.returncode, 1)
        self.assertIn("cannot listen on 0.0.0.0", out.stderr)

    def test_port_in_use_is_one_clear_line(self):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            out = self.run_main("--port", str(taken.getsockname()[1]))
        self.assertEqual(out.returncode, 1)
        self.assertEqual(len(out.stderr.strip().splitlines()), 1, out.stderr)
        self.assertIn("cannot listen on 127.0.0.1", out.stderr)

    def test_daemon_serves_logs_without_content_and_stops_on_sigterm(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        daemon = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "claude_max_proxy.py"), "--port", str(port)],
            stderr=subprocess.PIPE, text=True, env=self.daemon_env(CLAUDE_BIN=self.fake_path))
        try:
            first = daemon.stderr.readline()
            self.assertIn("serving http://127.0.0.1:%d/v1" % port, first)
            self.assertIn(self.fake_path, first)
            self.assertIn("2.1.331", first)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("POST", "/v1/chat/completions", body=json.dumps({
                "model": "opus", "messages": [{"role": "user", "content": "PRIVATE-WORDS"}]}),
                headers={"Content-Type": "application/json"})
            body = json.loads(conn.getresponse().read())
            conn.close()
            line = daemon.stderr.readline()
            for part in ("POST /v1/chat/completions 200", "model=opus", "tokens=12/9",
                         "id=" + body["id"]):
                self.assertIn(part, line)
            daemon.send_signal(signal.SIGTERM)
            self.assertEqual(daemon.wait(20), 0)
            rest = daemon.stderr.read()
            self.assertNotIn("PRIVATE-WORDS", first + line + rest)
            self.assertNotIn("Hello from the fake API", first + line + rest)
            self.assertNotIn("Traceback", rest)
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
            daemon.stderr.close()

    @staticmethod
    def daemon_env(**extra):
        env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
        env.update(extra)
        return env

    def test_missing_cli_does_not_stop_the_daemon(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        daemon = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "claude_max_proxy.py"), "--port", str(port),
             "--claude-bin", "/nonexistent/claude"], stderr=subprocess.PIPE, text=True,
            env=self.daemon_env(ANTHROPIC_API_KEY="sk-ant-x"))
        try:
            first = daemon.stderr.readline()
            self.assertIn("WARNING", first)
            self.assertIn("not found", first)
            self.assertIn("uses an API key (ANTHROPIC_API_KEY", daemon.stderr.readline())
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/health")
            self.assertEqual(conn.getresponse().status, 503)
            conn.close()
        finally:
            daemon.terminate()
            self.assertEqual(daemon.wait(20), 0)
            daemon.stderr.close()


class ShutdownTest(FakeClaudeMixin, unittest.TestCase):
    """SIGTERM and SIGINT: stop accepting, a grace period for requests in flight, then every CLI
    process group ended and exit 0, never an orphan `claude`."""

    def start_daemon(self, *args):
        return start_daemon(self, *args)

    @staticmethod
    def refused(port):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            return False
        except (ConnectionRefusedError, ConnectionResetError):  # reset: left in the backlog
            return True

    def test_requests_in_flight_finish_then_it_exits_0(self):
        daemon, port = self.start_daemon("--shutdown-grace", "60")
        sockets = [send_chat(port, chat_body("[[fake:gate:go]]")),
                   send_chat(port, chat_body("[[fake:gate:go]]", stream=True))]
        wait_until(lambda: len(self.runs()) == 2, what="two CLIs")
        kept = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # kept alive across
        kept.request("GET", "/health")
        self.assertEqual(json.loads(kept.getresponse().read())["status"], "ok")
        daemon.send_signal(signal.SIGTERM)
        wait_until(lambda: self.refused(port), what="the daemon to stop accepting")
        self.assertIsNone(daemon.poll(), "it waits for the requests in flight")
        kept.request("GET", "/health")  # a connection from before: served, says it is stopping
        response = kept.getresponse()
        self.assertEqual((response.status, json.loads(response.read())["status"]),
                         (503, "stopping"))
        kept.request("POST", "/v1/chat/completions", body=json.dumps(chat_body()),
                     headers={"Content-Type": "application/json"})
        response = kept.getresponse()
        self.assertEqual((response.status, json.loads(response.read())["error"]["code"]),
                         (503, "shutting_down"), "no new CLI once stopping")
        kept.close()
        open(os.path.join(self.log_dir, "go"), "w").close()
        status, _, body = read_response(sockets[0])
        self.assertEqual((status, body["choices"][0]["message"]["content"]),
                         (200, "Hello from the fake API."))
        status, _, data = read_response(sockets[1])
        self.assertEqual((status, parse_sse(data)[-1]), (200, "[DONE]"))
        self.assertEqual(daemon.wait(20), 0)
        log = daemon.log()
        self.assertIn("SIGTERM: shutting down", log)
        self.assertNotIn("Traceback", log)
        self.assert_runs_ended()

    def test_past_the_grace_every_cli_is_ended_and_its_client_told(self):
        daemon, port = self.start_daemon("--shutdown-grace", "0.5", "--max-concurrency", "1")
        running = send_chat(port, chat_body("[[fake:silent]][[fake:child]]"))
        wait_until(lambda: self.runs(), what="the CLI")
        queued = send_chat(port, chat_body("never runs"))
        wait_until(lambda: json.loads(http_get(port, "/health"))["requests_waiting"] == 1,
                   what="a request to wait")
        daemon.send_signal(signal.SIGINT)
        for sock in (queued, running):
            status, _, body = read_response(sock)
            self.assertEqual((status, body["error"]["code"]), (503, "shutting_down"))
        self.assertEqual(daemon.wait(20), 0)
        self.assertEqual(len(self.runs()), 1, "the waiting request never started a CLI")
        self.assert_runs_ended()
        self.assertNotIn("Traceback", daemon.log())

    def test_a_second_signal_skips_the_grace(self):
        daemon, port = self.start_daemon("--shutdown-grace", "600")
        sock = send_chat(port, chat_body("[[fake:silent]]", stream=True))
        wait_until(lambda: self.runs(), what="the CLI")
        daemon.send_signal(signal.SIGTERM)
        wait_until(lambda: self.refused(port), what="the daemon to stop accepting")
        daemon.send_signal(signal.SIGTERM)
        self.assertEqual(daemon.wait(20), 0)
        self.assertEqual(read_response(sock)[0], 503)
        self.assert_runs_ended()

    def assert_runs_ended(self):
        for run in self.runs():
            wait_until(lambda: not alive(run["pid"]), what="claude %d to end" % run["pid"])
            if "child" in run:
                wait_until(lambda: not alive(run["child"]), what="its child to end")


def start_daemon(test, *args, claude_bin=None, env=None):
    """`python3 claude_max_proxy.py --port 0 ARGS` with the fake CLI (or `claude_bin`), logging
    to a file (a pipe nobody reads would fill up and stop it); stopped at the test's end.
    (daemon, port)."""
    log_path = tempfile.mktemp(prefix="proxy-daemon-", suffix=".log")
    test.addCleanup(lambda: os.path.exists(log_path) and os.unlink(log_path))
    with open(log_path, "w") as log:
        daemon = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "claude_max_proxy.py"), "--port", "0",
             "--claude-bin", claude_bin or test.fake_path] + list(args),
            stderr=log, text=True, env=env or MainTest.daemon_env())

    def stop():
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()

    test.addCleanup(stop)

    def read_log():
        with open(log_path) as f:
            return f.read()

    daemon.log = read_log
    found = wait_until(lambda: re.search(r"serving http://127.0.0.1:(\d+)/v1", read_log())
                       or daemon.poll() is not None, what="the daemon to start")
    if daemon.poll() is not None:
        raise AssertionError("the daemon did not start: " + read_log())
    return daemon, int(found[1])


def http_get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        return conn.getresponse().read()
    finally:
        conn.close()


class PackagingTest(unittest.TestCase):
    def test_plist_is_valid_and_keeps_the_daemon_alive(self):
        with open(os.path.join(HERE, "com.claude-max-api.plist"), "rb") as f:
            plist = plistlib.load(f)
        self.assertEqual(plist["Label"], "com.claude-max-api")
        self.assertTrue(plist["KeepAlive"])
        self.assertTrue(plist["RunAtLoad"])
        args = plist["ProgramArguments"]
        self.assertTrue(all(os.path.isabs(a) for a in args[:2]), args)
        self.assertTrue(args[1].endswith("claude_max_proxy.py"))
        path = plist["EnvironmentVariables"]["PATH"].split(":")
        self.assertIn("/opt/homebrew/bin", path)
        self.assertIn("/usr/local/bin", path)
        for key in ("StandardOutPath", "StandardErrorPath"):
            self.assertTrue(os.path.isabs(plist[key]))
        self.assertEqual(plist["ProcessType"], "Interactive", "not throttled by launchd")
        self.assertEqual(plist["ProcessType"], plistlib.loads(proxy.LaunchdService(
            ["--port", "3456"]).text().encode())["ProcessType"], "what install writes")

    def test_module_imports_only_the_standard_library(self):
        import ast
        with open(os.path.join(HERE, "claude_max_proxy.py")) as f:
            tree = ast.parse(f.read())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                names.add(node.module.split(".")[0])
        stdlib = getattr(sys, "stdlib_module_names", None)
        if stdlib is None:
            self.skipTest("needs Python 3.10+ to list the standard library")
        self.assertEqual(sorted(n for n in names if n not in stdlib), [])

    def test_the_module_docstring_maps_the_sections_as_they_are(self):
        """The docstring's list of sections is the file's banners, word for word and in order:
        the map a reader opens the file with cannot drift from the file."""
        with open(os.path.join(HERE, "claude_max_proxy.py"), encoding="utf-8") as f:
            source = f.read()
        banners = re.findall(r"(?m)^#{78}\n# (.+)\n#{78}$", source)
        listed = re.search(r"\nSections, [^\n]*\n[^\n]*\n\n((?:    .+\n)+)\n",
                           proxy.__doc__ or "")
        self.assertIsNotNone(listed, "no list of sections in the module docstring")
        self.assertEqual([line.strip() for line in listed.group(1).splitlines()], banners)
        self.assertGreaterEqual(len(banners), 10)
        self.assertEqual(banners[-1], "Running it: main()")
        # Every top-level definition is under some banner, and main() comes last.
        self.assertLess(source.index("#" * 78), source.index("\ndef "))
        self.assertGreater(source.index("\ndef main("), source.rindex("#" * 78))

    def test_readme_names_the_test_command_and_pyproject_the_script(self):
        with open(os.path.join(HERE, "README.md")) as f:
            readme = f.read()
        self.assertIn("python3 -m unittest -v test_proxy", readme)
        with open(os.path.join(HERE, "pyproject.toml")) as f:
            pyproject = f.read()
        self.assertIn('claude-max-api = "claude_max_proxy:main"', pyproject)
        self.assertIn('py-modules = ["claude_max_proxy"]', pyproject)
        with open(os.path.join(HERE, ".ci", "run")) as f:
            self.assertIn("python3 -m unittest -v test_proxy", f.read())


##############################################################################
# Running at login: `service` with stand-ins for launchctl and systemctl
##############################################################################

# launchctl and systemctl as far as `service` uses them. Each records its arguments, then does
# what the real one would: bootstrap / enable --now / restart start the daemon from the written
# plist's ProgramArguments and PATH, or the unit's ExecStart and Environment (as the test's
# grandchild, in its own session); bootout / disable --now end it; print / is-active say
# whether it runs. $STANDIN_DIR holds the log and the daemon's pid.
STANDIN = r'''
import json, os, plistlib, re, shlex, signal, subprocess, sys, time
here = os.environ["STANDIN_DIR"]
args = sys.argv[1:]
with open(os.path.join(here, "calls.jsonl"), "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0])] + args) + "\n")
pidfile = os.path.join(here, "daemon.pid")

def running():
    try:
        with open(pidfile) as f:
            pid = int(f.read())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None

def start(argv, path, log):
    # What launchd and systemd give a service: not the caller's environment, only this (and
    # the fake claude's log directory, for the test).
    env = {"HOME": os.environ["HOME"], "PATH": path,
           "FAKE_CLAUDE_LOG": os.environ.get("FAKE_CLAUDE_LOG", "")}
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    with open(pidfile, "w") as f:
        f.write(str(proc.pid))

def stop():
    pid = running()
    if pid:
        os.kill(pid, signal.SIGTERM)
        for _ in range(200):
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    break
            except ChildProcessError:
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
            time.sleep(0.05)
    if os.path.exists(pidfile):
        os.unlink(pidfile)

def unit():
    path = os.path.join(os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"),
                        "systemd", "user", "claude-max-api.service")
    with open(path) as f:
        text = f.read().replace("%%", "\0").replace("$$", "$")
    execstart = shlex.split(re.search(r"^ExecStart=(.*)$", text, re.M).group(1))
    env = shlex.split(re.search(r"^Environment=(.*)$", text, re.M).group(1))[0]
    return [a.replace("\0", "%") for a in execstart], env.split("=", 1)[1]

name = os.path.basename(sys.argv[0])
if name == "launchctl":
    if args[0] == "print":
        sys.exit(0 if running() else 113)
    if args[0] == "bootstrap":
        if running():
            sys.exit("Bootstrap failed: 5: Input/output error")
        with open(args[2], "rb") as plist_file:
            plist = plistlib.load(plist_file)
        start(plist["ProgramArguments"], plist["EnvironmentVariables"]["PATH"],
              plist["StandardOutPath"])
    elif args[0] == "bootout":
        if not running():
            sys.exit("Boot-out failed: 3: No such process")
        stop()
else:
    action = args[1]
    if action == "is-active":
        sys.exit(0 if running() else 3)
    if action == "enable" and "--now" in args and not running():
        command, path = unit()
        start(command, path, os.path.join(here, "journal.log"))
    elif action == "restart":
        stop()
        command, path = unit()
        start(command, path, os.path.join(here, "journal.log"))
    elif action == "disable" and "--now" in args:
        stop()
'''


def health_of(port):
    """(status, body) of /health on `port`, or None when nothing answers there."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/health")
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    except ConnectionRefusedError:
        return None
    finally:
        conn.close()


class ServiceTest(FakeClaudeMixin, unittest.TestCase):
    """`service install / status / uninstall` in a temp HOME, for launchd and systemd."""

    def setUp(self):
        super().setUp()
        root = tempfile.mkdtemp(prefix="proxy-service-")
        self.addCleanup(shutil.rmtree, root, True)
        self.home, self.standin = os.path.join(root, "home"), os.path.join(root, "standin")
        os.makedirs(os.path.join(self.home, ".claude"))
        # Logged in with claude.ai, as a user whose service starts at login is (the fake's
        # `auth status` sees the file; the service's environment has no token).
        with open(os.path.join(self.home, ".claude", ".credentials.json"), "w") as f:
            f.write("{}")
        os.makedirs(os.path.join(self.standin, "bin"))
        for name in ("launchctl", "systemctl"):
            path = os.path.join(self.standin, "bin", name)
            with open(path, "w") as f:
                f.write("#!%s\n%s" % (sys.executable, STANDIN))
            os.chmod(path, 0o755)
        patch = mock.patch.dict(os.environ, {
            "HOME": self.home, "STANDIN_DIR": self.standin, "XDG_CONFIG_HOME": "",
            "PATH": os.path.join(self.standin, "bin") + os.pathsep + os.environ["PATH"]})
        patch.start()
        self.addCleanup(patch.stop)
        self.addCleanup(self.stop_daemon)
        with socket.socket() as s:  # a free port for the daemon the service starts
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]

    def stop_daemon(self):
        try:
            with open(os.path.join(self.standin, "daemon.pid")) as f:
                pid = int(f.read())
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass

    def service(self, platform, *args):
        """(exit code, what it printed) of `claude-max-api service ARGS` on `platform`."""
        out = io.StringIO()
        with mock.patch.object(sys, "platform", platform), \
                contextlib.redirect_stdout(out):
            try:
                code = proxy.main(["service"] + list(args))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
                out.write(str(e.code))
        return code, out.getvalue()

    def calls(self):
        try:
            with open(os.path.join(self.standin, "calls.jsonl")) as f:
                return [json.loads(line) for line in f]
        except FileNotFoundError:
            return []

    def plist(self):
        with open(os.path.join(self.home, "Library", "LaunchAgents",
                               "com.claude-max-api.plist"), "rb") as f:
            return plistlib.load(f)

    def test_launchd_install_status_again_and_uninstall(self):
        code, said = self.service("darwin", "install", "--port", str(self.port))
        self.assertEqual(code, 0, said)
        self.assertIn("serving http://127.0.0.1:%d/v1 with Claude Code 2.1.331" % self.port,
                      said)
        log = os.path.join(self.home, "Library", "Logs", "claude-max-api.log")
        self.assertIn("log: " + log, said)
        plist = self.plist()
        self.assertEqual(plist["Label"], "com.claude-max-api")
        self.assertEqual(plist["ProgramArguments"], [
            sys.executable, os.path.abspath(proxy.__file__), "--port", str(self.port)])
        self.assertEqual(plist["EnvironmentVariables"]["PATH"].split(":")[0], self.bin_dir,
                         "the directory of the claude found now comes first")
        self.assertEqual((plist["StandardOutPath"], plist["StandardErrorPath"]), (log, log))
        self.assertEqual((plist["ProcessType"], plist["RunAtLoad"], plist["KeepAlive"]),
                         ("Interactive", True, True))
        uid = os.getuid()
        self.assertIn(["launchctl", "bootstrap", "gui/%d" % uid, os.path.join(
            self.home, "Library", "LaunchAgents", "com.claude-max-api.plist")], self.calls())
        self.assertEqual(health_of(self.port)[0], 200)
        code, said = self.service("darwin", "status", "--port", str(self.port))
        self.assertEqual(code, 0, said)
        self.assertIn("answering: yes, ok with Claude Code 2.1.331", said)
        # Again: harmless; the loaded one is booted out, the new one bootstrapped.
        code, said = self.service("darwin", "install", "--port", str(self.port))
        self.assertEqual(code, 0, said)
        self.assertEqual([c[1] for c in self.calls() if c[1] != "print"],
                         ["bootstrap", "bootout", "bootstrap"])
        code, said = self.service("darwin", "uninstall")
        self.assertEqual(code, 0, said)
        self.assertFalse(os.path.exists(os.path.join(self.home, "Library", "LaunchAgents",
                                                     "com.claude-max-api.plist")))
        self.assertEqual(health_of(self.port), None, "the daemon is gone")
        code, said = self.service("darwin", "status", "--port", str(self.port))
        self.assertEqual((code, said.splitlines()[0]), (3, "installed: no"))

    def test_systemd_install_status_again_and_uninstall(self):
        code, said = self.service("linux", "install", "--port", str(self.port),
                                  "--max-concurrency", "2")
        self.assertEqual(code, 0, said)
        self.assertIn("systemd --user", said)
        self.assertIn("loginctl enable-linger", said)
        unit = os.path.join(self.home, ".config", "systemd", "user", "claude-max-api.service")
        with open(unit) as f:
            text = f.read()
        self.assertIn('ExecStart="%s" "%s" "--port" "%d" "--max-concurrency" "2"' % (
            sys.executable, os.path.abspath(proxy.__file__), self.port), text)
        self.assertIn('Environment="PATH=%s:' % self.bin_dir, text)
        self.assertIn("WantedBy=default.target", text)
        self.assertEqual(health_of(self.port)[1]["max_concurrency"], 2)
        code, said = self.service("linux", "install", "--port", str(self.port))
        self.assertEqual(code, 0, said)
        self.assertEqual(health_of(self.port)[1]["max_concurrency"], 4,
                         "a second install restarts it with its new flags")
        self.assertEqual([c[2:] for c in self.calls() if c[2] != "is-active"], [
            ["daemon-reload"], ["enable", "--now", "claude-max-api.service"],
            ["daemon-reload"], ["enable", "--now", "claude-max-api.service"],
            ["restart", "claude-max-api.service"]])
        self.assertEqual(self.service("linux", "status", "--port", str(self.port))[0], 0)
        code, said = self.service("linux", "uninstall")
        self.assertEqual(code, 0, said)
        self.assertFalse(os.path.exists(unit))
        self.assertIsNone(health_of(self.port))

    def test_keys_go_to_a_private_file_never_into_the_service(self):
        code, said = self.service("darwin", "install", "--port", str(self.port),
                                  "--api-key", "sk-secret-1")
        self.assertEqual(code, 0, said)
        keys = os.path.join(self.home, ".config", "claude-max-api", "keys")
        self.assertEqual(os.stat(keys).st_mode & 0o777, 0o600)
        with open(keys) as f:
            self.assertEqual(f.read().strip(), "sk-secret-1")
        arguments = self.plist()["ProgramArguments"]
        self.assertEqual(arguments[-2:], ["--api-key-file", keys])
        with open(os.path.join(self.home, "Library", "LaunchAgents",
                               "com.claude-max-api.plist")) as f:
            self.assertNotIn("sk-secret-1", f.read())
        status, _, _ = raw_request(self.port)
        self.assertEqual(status, 401, "the daemon asks for the key")
        status, _, _ = raw_request(self.port, headers=(("Host", "127.0.0.1"), (
            "Authorization", "Bearer sk-secret-1")))
        self.assertEqual(status, 200)

    def test_only_the_flags_count_not_the_installers_environment(self):
        with mock.patch.dict(os.environ, {"CLAUDE_MAX_API_PORT": "1", "CLAUDE_BIN": "/nope",
                                          "CLAUDE_MAX_API_KEY": "shell-key"}):
            code, said = self.service("linux", "install", "--port", str(self.port))
            self.assertEqual(os.environ["CLAUDE_MAX_API_PORT"], "1", "left as it was")
        self.assertEqual(code, 0, said)
        self.assertIn("serving http://127.0.0.1:%d/v1" % self.port, said)
        self.assertEqual(raw_request(self.port)[0], 200, "no key: the service got none")

    def test_print_changes_nothing(self):
        for platform in ("darwin", "linux"):
            code, said = self.service(platform, "install", "--print", "--api-key",
                                      "sk-print-secret", "--port", "4000")
            self.assertEqual(code, 0, said)
            self.assertIn("would run:", said)
            self.assertIn("the claude CLI found now: " + self.fake_path, said)
            self.assertIn("--api-key-file", said)
            self.assertNotIn("sk-print-secret", said)
        self.assertEqual(os.listdir(self.home), [".claude"], "nothing written but the login")
        questions = [["launchctl", "print"], ["systemctl", "--user", "is-active"]]
        self.assertEqual([c for c in self.calls() if c[:2] not in questions and
                          c[:3] not in questions], [], "only questions were asked")

    def test_a_file_changed_by_hand_is_kept_without_force(self):
        self.assertEqual(self.service("linux", "install", "--port", str(self.port))[0], 0)
        unit = os.path.join(self.home, ".config", "systemd", "user", "claude-max-api.service")
        with open(unit, "a") as f:
            f.write("Nice=5\n")
        code, said = self.service("linux", "install", "--port", str(self.port))
        self.assertEqual(code, 1)
        self.assertIn("changed by hand", said)
        with open(unit) as f:
            self.assertIn("Nice=5", f.read())
        self.assertEqual(self.service("linux", "install", "--force", "--port",
                                      str(self.port))[0], 0)
        with open(unit) as f:
            self.assertNotIn("Nice=5", f.read())

    def test_unit_text_quotes_what_systemd_would_expand(self):
        with mock.patch.object(sys, "platform", "linux"):
            service = proxy.SystemdService(["--allowed-host", "a%b$c"])
        line = [l for l in service.text().splitlines() if l.startswith("ExecStart=")][0]
        self.assertIn('"--allowed-host" "a%%b$$c"', line)
        self.assertFalse(proxy.changed_by_hand(os.path.join(self.home, "absent")))

    def test_bad_flags_and_platforms_are_one_line(self):
        code, said = self.service("linux", "install", "--port", "notanumber")
        self.assertEqual(code, 2)
        code, said = self.service("win32", "install")
        self.assertEqual(code, 1)
        self.assertIn("only macOS (launchd) and Linux (systemd)", said)


##############################################################################
# The real CLI against a fake Anthropic Messages API
##############################################################################

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}},
                  "required": ["city"]}
TOOLS_BY_DIALECT = {
    "chat": [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                               "parameters": WEATHER_SCHEMA}}],
    "messages": [{"name": "get_weather", "description": "Weather",
                  "input_schema": WEATHER_SCHEMA}],
    "responses": [{"type": "function", "name": "get_weather", "description": "Weather",
                   "parameters": WEATHER_SCHEMA}]}


def converse(p, dialect, turns, marker, call_at=4, restart_at=None, restart=None, words=0):
    """A conversation of `turns` requests through dialect "chat", "messages" or "responses"
    as their clients hold one: Chat and Messages send the whole history each time, Responses
    chains previous_response_id. Request `call_at` asks the model (FakeAnthropicAPI) for a
    tool call, the next one carries its result; `words`: the length of the other answers.
    Before request `restart_at`, `restart()` gives the proxy to go on with. Returns per request (prompt tokens, cache-read tokens,
    seconds), from the usage the client got."""
    tools = TOOLS_BY_DIALECT[dialect]
    history, previous, figures = [], None, []
    pending = None  # the call to answer in the next request
    for n in range(1, turns + 1):
        if n == restart_at:
            p = restart()
        say = "%s turn %d.%s" % (marker, n, ' [[api:call:get_weather:{"city": "Oslo"}]]'
                                 if n == call_at else " [[api:words:%d]]" % words if words
                                 else "")
        if dialect == "chat":
            if pending:
                history.append({"role": "tool", "tool_call_id": pending, "content": "sunny"})
            else:
                history.append({"role": "user", "content": say})
            body = {"model": "sonnet", "messages": history, "tools": tools}
            path = "/v1/chat/completions"
        elif dialect == "messages":
            history.append({"role": "user", "content": [{
                "type": "tool_result", "tool_use_id": pending, "content": "sunny"}]
                if pending else say})
            body = {"model": "sonnet", "max_tokens": 1024, "messages": history, "tools": tools}
            path = "/v1/messages"
        else:
            body = {"model": "sonnet", "tools": tools, "input": [{
                "type": "function_call_output", "call_id": pending, "output": "sunny"}]
                if pending else say}
            if previous:
                body["previous_response_id"] = previous
            path = "/v1/responses"
        started = time.monotonic()
        status, _, answer = p.request("POST", path, body)
        took = time.monotonic() - started
        assert status == 200, (n, answer)
        pending = None
        if dialect == "chat":
            message = answer["choices"][0]["message"]
            history.append({k: v for k, v in message.items() if v is not None})
            pending = (message.get("tool_calls") or [{}])[0].get("id")
            usage = answer["usage"]
            prompt, read = usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]
        elif dialect == "messages":
            history.append({"role": "assistant", "content": answer["content"]})
            pending = next((b["id"] for b in answer["content"] if b["type"] == "tool_use"), None)
            usage = answer["usage"]
            read = usage["cache_read_input_tokens"]
            prompt = usage["input_tokens"] + usage["cache_creation_input_tokens"] + read
        else:
            previous = answer["id"]
            pending = next((o["call_id"] for o in answer["output"]
                            if o["type"] == "function_call"), None)
            usage = answer["usage"]
            prompt, read = usage["input_tokens"], usage["input_tokens_details"]["cached_tokens"]
        assert (pending is not None) == (n == call_at), (n, answer)
        figures.append((prompt, read, took))
    return figures


def cache_table(title, figures):
    """The per-turn figures of converse() as lines of a table."""
    lines = [title, "  turn  prompt  cache read  of the previous prompt  seconds"]
    for n, (prompt, read, took) in enumerate(figures, 1):
        share = "%5.1f%%" % (100.0 * read / figures[n - 2][0]) if n > 1 else "     -"
        lines.append("  %4d  %6d  %10d  %21s  %7.3f" % (n, prompt, read, share, took))
    return "\n".join(lines)


def find_real_claude():
    """The real CLI for the end-to-end tests: $CLAUDE_E2E_BIN, else the one CI installs."""
    configured = os.environ.get("CLAUDE_E2E_BIN")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    local = os.path.join(HERE, ".ci", ".tools", "node_modules", ".bin", "claude")
    return local if os.access(local, os.X_OK) else None


# The two texts the API answers a subscription request with when only extra usage could pay
# for it (a 400, invalid_request_error).
THIRD_PARTY_REFUSAL = ("Third-party apps now draw from your extra usage, not your plan limits. "
                       "Enable extra usage in your account settings to keep going.")
LONG_CONTEXT_REFUSAL = "Extra usage is required for long context requests."


class FakeAnthropicAPI(ThreadingHTTPServer):
    """Just enough of the Anthropic Messages API for the CLI: POST /v1/messages (streaming SSE)
    and HEAD /. The last user message chooses the answer: [[api:err401]], [[api:toolong]],
    [[api:err529]], [[api:hold]] (streams one word, then waits for `release`)."""

    daemon_threads = True

    def __init__(self):
        self.requests = []
        self.usages = []  # (request body, the usage answered to it)
        self.prefixes = {}  # the prompt cache: hash of a prefix ending at a breakpoint -> tokens
        self.request_headers = []
        self.calls = {}  # last user message -> how many API calls it had
        self.lock = threading.Lock()
        self.release = threading.Event()
        # Headers every answer carries: a subscription's anthropic-ratelimit-unified-* ones,
        # which the CLI reports as rate_limit_event lines on an OAuth login (name -> value).
        self.unified = {}
        super().__init__(("127.0.0.1", 0), FakeAnthropicHandler)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a CLI that was ended: expected
            super().handle_error(request, client_address)

    def url(self):
        return "http://127.0.0.1:%d" % self.server_address[1]

    def usage_of(self, body):
        return next(usage for sent, usage in self.usages if sent is body)

    def cached_usage(self, body):
        """Anthropic's prompt cache rule, simulated: the prompt is its tools, system blocks and
        message blocks in that order; each prefix that ends at a block carrying cache_control
        is remembered (hash -> tokens, about 4 characters each). The usage reads the longest
        remembered prefix this prompt starts with, creates the rest up to its last
        breakpoint, and counts what follows as input. The markers themselves and how a text
        is written (a string or one text block) are not part of the prompt, as in the API."""
        items = [("tool", t) for t in body.get("tools") or []]
        system = body.get("system") or []
        items += [("system", b) for b in ([{"type": "text", "text": system}]
                                          if isinstance(system, str) else system)]
        for n, message in enumerate(body["messages"]):
            content = message["content"]
            for block in [{"type": "text", "text": content}] if isinstance(content, str) \
                    else content:
                items.append(("message", n, message["role"], block))
        digest = hashlib.sha256(body.get("model", "").encode())
        tokens = read = last_mark = 0
        for item in items:
            plain = item[:-1] + ({k: v for k, v in item[-1].items() if k != "cache_control"},)
            text = json.dumps(plain, sort_keys=True, ensure_ascii=False)
            digest.update(text.encode())
            tokens += max(1, len(text) // 4)
            with self.lock:
                if digest.hexdigest() in self.prefixes:
                    read = tokens
            if "cache_control" in item[-1]:
                last_mark = tokens
                with self.lock:
                    self.prefixes[digest.hexdigest()] = tokens
        return {"input_tokens": tokens - max(read, last_mark),
                "cache_creation_input_tokens": max(0, last_mark - read),
                "cache_read_input_tokens": read, "output_tokens": 1}


class FakeAnthropicHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        self.error(404, "not_found_error", "no such endpoint")

    def send_response(self, code, message=None):
        super().send_response(code, message)
        for name, value in dict(self.server.unified).items():
            self.send_header(name, value)

    def error(self, status, kind, message, headers=()):
        data = json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("request-id", "req_fake")
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not self.path.startswith("/v1/messages"):
            return self.error(404, "not_found_error", "no such endpoint")
        self.server.requests.append(body)
        self.server.request_headers.append(dict(self.headers))
        # 2.1.331 puts a role "system" message after the user's: read the last user message.
        last = [m for m in body["messages"] if m.get("role") == "user"][-1]["content"]
        text = last if isinstance(last, str) else " ".join(
            b.get("text", "") for b in last if isinstance(b, dict))
        if "[[api:err401]]" in text:
            return self.error(401, "authentication_error", "invalid x-api-key")
        if "[[api:toolong]]" in text:
            return self.error(400, "invalid_request_error",
                              "prompt is too long: 250000 tokens > 200000 maximum")
        if "[[api:err429]]" in text:
            # A subscription at its limit: the unified rate-limit headers say when it resets.
            return self.error(429, "rate_limit_error", "Rate limited", headers=[
                ("retry-after", "300"), ("anthropic-ratelimit-unified-status", "rejected"),
                ("anthropic-ratelimit-unified-reset", str(int(time.time()) + 300))])
        if "[[api:err529]]" in text:
            return self.error(529, "overloaded_error", "Overloaded")
        # The API's refusals of a subscription request that only extra usage could pay for.
        if "[[api:third_party]]" in text:
            return self.error(400, "invalid_request_error", THIRD_PARTY_REFUSAL)
        if "[[api:long_context]]" in text:
            return self.error(400, "invalid_request_error", LONG_CONTEXT_REFUSAL)
        model = body.get("model", "claude-test")
        # A prompt's calls are counted: [[api:differ]] answers other words after the first.
        # The first text block is the prompt: a resumed call adds a reminder after it.
        prompt = (last if isinstance(last, str) else last[0].get("text", "")).strip()
        with self.server.lock:
            self.server.calls[prompt] = call = self.server.calls.get(prompt, 0) + 1
        words = re.search(r"\[\[api:words:(\d+)\]\]", text)
        letter = "v" if "[[api:differ]]" in text and call > 1 else "w"
        pieces = ["%s%s%d" % (" " if i else "", letter, i) for i in range(int(words.group(1)))] \
            if words else ["Hello", " from", " the", " fake", " API."]
        # [[api:reply:TEXT]] in the conversation's first message: the model answers TEXT.
        first = body["messages"][0]["content"]
        reply = re.search(r"\[\[api:reply:(.*?)\]\]", first if isinstance(first, str) else
                          " ".join(b.get("text", "") for b in first if isinstance(b, dict)), re.S)
        if reply:
            pieces = [w for w in re.split(r"(?=\s)", reply.group(1)) if w]
        blocks = [("text", pieces)]
        # [[api:call:NAME:JSON]] (repeatable) calls the offered tool NAME (or mcp__*__NAME)
        # with the JSON as its input, after a short text: the answer stops with tool_use.
        calls = []
        for name, arguments in re.findall(r"\[\[api:call:([A-Za-z0-9_-]+):(\{.*?\})\]\]",
                                          text.replace('\\"', '"')):  # (or JSON-quoted)
            try:
                calls.append((name, json.dumps(json.loads(arguments))))
            except ValueError:
                pass  # a marker quoted inside other text: not a call
        if calls and ("<tool_result" in text or not isinstance(last, str) and any(
                b.get("type") == "tool_result" for b in last if isinstance(b, dict))):
            calls = []  # a call's result came back (or the CLI's denial of it): plain text
        offered = [t.get("name", "") for t in body.get("tools") or []]
        if calls:
            blocks = [("text", ["Let me", " check."])]
            for n, (name, arguments) in enumerate(calls):
                match = [o for o in offered if o == name or o.endswith("__" + name)]
                if not match:
                    blocks = [("text", ["No tool %s was offered." % name])]
                    break
                half = len(arguments) // 2
                blocks.append(("tool_use", {"id": "toolu_e2e_%d_%d" % (call, n),
                                            "name": match[0], "input": json.loads(arguments),
                                            "pieces": [arguments[:half], arguments[half:]]}))
        if "[[api:thinking]]" in text:
            blocks.insert(0, ("thinking", ["Let me think."]))  # one delta, as in p-thinking
        # [[api:max_tokens]] cuts the first answer short; the CLI then asks for the rest.
        stop = "max_tokens" if "[[api:max_tokens]]" in text or "[[api:always_max_tokens]]" in \
            json.dumps(body["messages"]) else "end_turn"
        if any(kind == "tool_use" for kind, _ in blocks):
            stop = "tool_use"
        usage = self.server.cached_usage(body)
        self.server.usages.append((body, usage))
        if not body.get("stream"):  # the CLI's own fallback after a stream that failed
            content = [{"type": "text", "text": "".join(p)} if kind == "text" else
                       {"type": "thinking", "thinking": "".join(p), "signature": "c2ln"}
                       if kind == "thinking" else
                       {"type": "tool_use", "id": p["id"], "name": p["name"], "input": p["input"]}
                       for kind, p in blocks]
            usage["output_tokens"] = 9
            data = json.dumps({"id": "msg_e2e_whole_%d" % call, "type": "message",
                               "role": "assistant", "model": model, "content": content,
                               "stop_reason": stop, "stop_sequence": None, "usage": usage})
            self.send_response(200)
            self.send_header("request-id", "req_fake_e2e")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data.encode())
            return
        # [[api:cut:K]] drops the connection after K text deltas, on every streamed call or,
        # with [[api:cuts:M]], on the first M.
        cut = re.search(r"\[\[api:cut:(\d+)\]\]", text)
        cuts = re.search(r"\[\[api:cuts:(\d+)\]\]", text)
        cut_after = int(cut.group(1)) if cut and (not cuts or call <= int(cuts.group(1))) \
            else None
        self.send_response(200)
        self.send_header("request-id", "req_fake_e2e")
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def send(kind, data):
            self.wfile.write(("event: %s\ndata: %s\n\n" % (kind, json.dumps(data))).encode())
            self.wfile.flush()

        send("message_start", {"type": "message_start", "message": {
            "id": "msg_e2e_%d" % call, "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}})
        sent_text = 0
        for index, (kind, block_pieces) in enumerate(blocks):
            empty = {"type": "text", "text": ""} if kind == "text" else {
                "type": "thinking", "thinking": "", "signature": ""}
            if kind == "tool_use":
                send("content_block_start", {"type": "content_block_start", "index": index,
                                             "content_block": {"type": "tool_use",
                                                               "id": block_pieces["id"],
                                                               "name": block_pieces["name"],
                                                               "input": {}}})
                for piece in block_pieces["pieces"]:
                    send("content_block_delta", {"type": "content_block_delta", "index": index,
                                                 "delta": {"type": "input_json_delta",
                                                           "partial_json": piece}})
                send("content_block_stop", {"type": "content_block_stop", "index": index})
                continue
            send("content_block_start", {"type": "content_block_start", "index": index,
                                         "content_block": empty})
            for i, piece in enumerate(block_pieces):
                if kind == "text" and sent_text == cut_after:
                    return  # the connection closes mid-answer: no block or message end
                delta = {"type": "text_delta", "text": piece} if kind == "text" else {
                    "type": "thinking_delta", "thinking": piece}
                send("content_block_delta", {"type": "content_block_delta", "index": index,
                                             "delta": delta})
                sent_text += kind == "text"
                if i == 0 and "[[api:hold]]" in text:
                    self.server.release.wait(60)
            if kind == "thinking":
                send("content_block_delta", {"type": "content_block_delta", "index": index,
                                             "delta": {"type": "signature_delta",
                                                       "signature": "c2ln"}})
            send("content_block_stop", {"type": "content_block_stop", "index": index})
        send("message_delta", {"type": "message_delta",
                               "delta": {"stop_reason": stop, "stop_sequence": None},
                               "usage": {"output_tokens": 9}})
        send("message_stop", {"type": "message_stop"})


@unittest.skipUnless(find_real_claude() or REQUIRE_ALL, "the real claude CLI is not installed "
                     "(npm install --prefix .ci/.tools @anthropic-ai/claude-code@2.1.331)")
class EndToEndTest(unittest.TestCase):
    """The proxy running the real claude CLI, which talks to FakeAnthropicAPI on 127.0.0.1."""

    @classmethod
    def setUpClass(cls):
        cls.claude = find_real_claude()
        if not cls.claude:
            raise AssertionError("PROXY_REQUIRE_ALL=1 but the real claude CLI is not installed")
        cls.api = FakeAnthropicAPI()
        threading.Thread(target=cls.api.serve_forever, daemon=True).start()
        cls.home = tempfile.mkdtemp(prefix="proxy-e2e-home-")
        cls.env_patch = mock.patch.dict(os.environ, {
            "HOME": cls.home, "ANTHROPIC_BASE_URL": cls.api.url(),
            "ANTHROPIC_API_KEY": "sk-ant-dummy", "DISABLE_TELEMETRY": "1",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1",
            "CLAUDE_CODE_MAX_RETRIES": "0", "CLAUDECODE": "1"})
        cls.env_patch.start()
        cls.proxy = Proxy(claude_bin=cls.claude, timeout=120.0, idle_timeout=60.0)

    @classmethod
    def tearDownClass(cls):
        cls.proxy.close()
        cls.env_patch.stop()
        cls.api.shutdown()
        cls.api.server_close()
        shutil.rmtree(cls.home, ignore_errors=True)

    def setUp(self):
        self.api.requests.clear()
        self.api.usages.clear()
        self.api.request_headers.clear()
        self.api.calls.clear()
        self.api.release.clear()

    def api_request(self, marker):
        """(the Messages API request the CLI sent for `marker`, its last user message)."""
        for body in self.api.requests:
            users = [m for m in body["messages"] if m["role"] == "user"]
            if users and marker in json.dumps(users[-1]):
                return body, users[-1]
        self.fail("no API request carried %r (saw %d)" % (marker, len(self.api.requests)))

    def test_health_sees_the_real_cli(self):
        status, _, body = self.proxy.request("GET", "/health")
        self.assertEqual(status, 200)
        self.assertTrue(body["claude"]["version"].startswith("2.1.331"))

    def test_chat_through_the_real_cli(self):
        status, _, body = self.proxy.chat("e2e-marker-1")
        self.assertEqual(status, 200, body)
        self.assertEqual(body["choices"][0]["message"]["content"], "Hello from the fake API.")
        sent, _ = self.api_request("e2e-marker-1")
        self.assertEqual(body["model"], sent["model"])  # the model the CLI reported
        self.assertIn("sonnet", sent["model"])
        usage = self.api.usage_of(sent)  # the API's, summed as OpenAI's
        self.assertEqual(body["usage"]["prompt_tokens"], usage["input_tokens"] + usage[
            "cache_creation_input_tokens"] + usage["cache_read_input_tokens"])
        self.assertEqual(body["usage"]["prompt_tokens_details"]["cached_tokens"],
                         usage["cache_read_input_tokens"])
        self.assertEqual(body["usage"]["completion_tokens"], 9)
        self.assertEqual(body["choices"][0]["finish_reason"], "stop")

    def test_streaming_through_the_real_cli(self):
        status, _, events = self.proxy.stream("e2e-marker-2",
                                              stream_options={"include_usage": True})
        self.assertEqual(status, 200)
        self.assertEqual(events[-1], "[DONE]")
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in events[:-2])
        self.assertEqual(text, "Hello from the fake API.")
        self.assertGreaterEqual(len([c for c in events[:-2]
                                     if c["choices"][0]["delta"].get("content")]), 5)
        self.assertEqual(events[-2]["usage"]["completion_tokens"], 9)

    def test_the_model_gets_no_tools_and_the_prompt_arrives_intact(self):
        status, _, _ = self.proxy.request("POST", "/v1/chat/completions", {
            "model": "claude-opus-4", "max_tokens": 77, "messages": [
                {"role": "system", "content": "-SYSTEM-MARKER\nsecond line"},
                {"role": "user", "content": "--help /config e2e-marker-3"}]})
        self.assertEqual(status, 200)
        sent, user = self.api_request("e2e-marker-3")
        self.assertEqual(sent.get("tools") or [], [], "no tool may be offered to the model")
        self.assertEqual(sent["max_tokens"], 77)
        self.assertIn("opus", sent["model"])
        self.assertIn("-SYSTEM-MARKER\nsecond line", json.dumps(sent["system"]).replace(
            "\\n", "\n"))
        self.assertIn("--help /config e2e-marker-3", json.dumps(user))

    def test_a_system_prompt_beyond_the_argument_limit_arrives(self):
        big = "S" * 300000  # Linux refuses a single argument over 128 KiB
        status, _, body = self.proxy.request("POST", "/v1/chat/completions", {
            "model": "sonnet", "messages": [{"role": "system", "content": big + " end"},
                                            {"role": "user", "content": "e2e-marker-9"}]})
        self.assertEqual(status, 200, body)
        sent, _ = self.api_request("e2e-marker-9")
        self.assertIn(big + " end", json.dumps(sent["system"]))

    def test_images_and_conversations_reach_the_api(self):
        # A first turn of the model: the daemon learns its session preamble from it.
        self.assertEqual(self.proxy.chat("e2e-warm-haiku", model="haiku")[0], 200)
        status, _, _ = self.proxy.request("POST", "/v1/chat/completions", {
            "model": "haiku", "messages": [
                {"role": "user", "content": "earlier turn"},
                {"role": "assistant", "content": "earlier answer"},
                {"role": "user", "content": [
                    {"type": "text", "text": "e2e-marker-4"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG_1PX}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]})
        self.assertEqual(status, 200)
        _, user = self.api_request("e2e-marker-4")
        blocks = user["content"]
        images = [b for b in blocks if b.get("type") == "image"]
        self.assertEqual(images[0]["source"], {"type": "base64", "media_type": "image/png",
                                               "data": PNG_1PX})
        self.assertEqual(images[1]["source"], {"type": "url", "url": "https://example.com/a.png"})
        body, _ = self.api_request("e2e-marker-4")
        self.assertEqual([(m["role"], m["content"]) for m in body["messages"]
                          if m["role"] == "assistant"], [("assistant", text("earlier answer"))],
                         "the earlier answer is the model's own turn")
        self.assertNotIn("earlier answer", json.dumps(blocks))

    def test_a_conversation_is_read_from_the_prompt_cache_in_every_dialect(self):
        """Ten requests per dialect, a tool call among them: from the second on, the cache
        covers at least 90% of the request before; the transcript covers only what comes
        before the conversation. Chat's goes on through a restarted daemon."""
        def restart():
            self.proxy.close()
            type(self).proxy = Proxy(claude_bin=self.claude, timeout=120.0, idle_timeout=60.0)
            return self.proxy

        for dialect in ("chat", "messages", "responses"):
            before = self.proxy
            resumed = before.server.sessions.resumed
            figures = converse(self.proxy, dialect, 10, "e2e-cache-" + dialect,
                               restart_at=6 if dialect == "chat" else None, restart=restart)
            for n in range(1, len(figures)):
                self.assertGreaterEqual(figures[n][1], 0.9 * figures[n - 1][0],
                                        cache_table(dialect, figures))
            # Every request after the first resumed a session (after the restart: 6 to 10).
            self.assertEqual(self.proxy.server.sessions.resumed - (
                resumed if self.proxy is before else 0), 9 if self.proxy is before else 5)
            self.assertIsNone(self.proxy.server.sessions.refused)
            body, _ = self.api_request("e2e-cache-%s turn 10." % dialect)
            roles = [m["role"] for m in body["messages"]]
            self.assertEqual(roles[:3], ["user", "system", "assistant"], roles)
            self.assertEqual(roles.count("assistant"), 9, roles)
            blocks = [b.get("type") for m in body["messages"] if isinstance(m["content"], list)
                      for b in m["content"]]
            self.assertEqual((blocks.count("tool_use"), blocks.count("tool_result")), (1, 1))
        transcript = Proxy(claude_bin=self.claude, timeout=120.0, idle_timeout=60.0,
                           history="transcript")
        try:
            figures = converse(transcript, "chat", 5, "e2e-cache-transcript", call_at=None,
                               words=200)
        finally:
            transcript.close()
        table = cache_table("transcript", figures)
        for n in range(1, len(figures)):
            self.assertLess(figures[n][1], 0.9 * figures[n - 1][0], table)
        # (The second reads nothing: the CLI's first system block varies with the first user
        # message, which the transcript changes.)
        self.assertEqual(len({read for _, read, _ in figures[2:]}), 1,
                         "only what precedes the conversation, the same each time: " + table)
        self.assertEqual(session_files(self.home), [], "nothing left in ~/.claude/projects")

    def test_a_first_request_that_calls_a_tool_teaches_the_preamble_in_time(self):
        """On a machine the daemon never ran on, a conversation that opens with a tool call
        (as Codex's often do): the follow-up comes as soon as the call is answered, before
        the CLI has exited, and is read from the cache already."""
        root = tempfile.mkdtemp(prefix="proxy-e2e-fresh-")
        self.addCleanup(shutil.rmtree, root, True)
        with mock.patch.object(tempfile, "tempdir", root):
            p = Proxy(claude_bin=self.claude, timeout=120.0, idle_timeout=60.0)
            self.addCleanup(p.close)
            figures = converse(p, "chat", 3, "e2e-opens-with-call", call_at=1)
        for n in range(1, len(figures)):
            self.assertGreaterEqual(figures[n][1], 0.9 * figures[n - 1][0],
                                    cache_table("opens with a call", figures))

    def test_the_fake_reads_sessions_as_the_real_cli_does(self):
        """For the session files the proxy writes, the messages the real CLI sends the API
        are the ones the fake's api_messages says (its environment text aside): what the
        conversation tests with the fake CLI rest on."""
        self.assertEqual(self.proxy.chat("e2e-fidelity warm-up", model="sonnet")[0], 200)
        call = {"type": "tool_use", "id": "toolu_fid_1", "name": "get_weather",
                "input": {"city": "Oslo"}}
        result = {"type": "tool_result", "tool_use_id": "toolu_fid_1", "content": "sunny"}
        asked = {"role": "user", "content": "e2e-fid weather?"}
        cases = [
            [asked, {"role": "assistant", "content": "Where?"},
             {"role": "user", "content": "e2e-fid 1"}],
            [asked, {"role": "assistant", "content": [{"type": "text", "text": "Looking."},
                                                      call]},
             {"role": "user", "content": [result]}],
            [asked, {"role": "assistant", "content": [call]},
             {"role": "user", "content": [result, {"type": "text", "text": "e2e-fid 3"}]}],
            [asked, {"role": "assistant", "content": "Hm."}, {"role": "user", "content": "a"},
             {"role": "user", "content": "e2e-fid 4"}],
            [asked, {"role": "assistant", "content": [call]}, {"role": "user", "content": [result]},
             {"role": "assistant", "content": "Sunny."},
             {"role": "user", "content": [{"type": "image", "source": {
                 "type": "base64", "media_type": "image/png", "data": PNG_1PX}},
                 {"type": "text", "text": "e2e-fid 5"}]}]]

        def plain(messages):
            out = []
            for m in messages:
                if m["role"] == "system":
                    continue
                content = text(m["content"]) if isinstance(m["content"], str) else m["content"]
                out.append((m["role"], [{k: v for k, v in b.items() if k != "cache_control"}
                                        for b in content]))
            return out

        for messages in cases:
            body = {"model": "sonnet", "max_tokens": 100, "messages": messages,
                    "tools": TOOLS_BY_DIALECT["messages"]}
            status, _, answer = self.proxy.request("POST", "/v1/messages", body)
            self.assertEqual(status, 200, answer)
            real = self.api.requests[-1]["messages"]
            request = proxy.parse_messages_request(body)
            history = proxy.conversation_history(
                request.turns, proxy.Launch("claude", request).offered_names(), True)
            rows = [json.loads(line) for line in proxy.session_lines(
                history, fake.preamble_rows("m"), str(proxy.uuid.uuid4()), "/", "2.1.331", "m",
                0.0).splitlines()]
            expected = fake.api_messages(rows, [] if history.stdin is None else [
                history.stdin], history.stdin is None, "m")
            self.assertEqual(plain(real), plain(expected), json.dumps(messages))
            self.assertEqual([m["role"] for m in real][:2], ["user", "system"])

    def test_conversations_in_parallel_and_edits_through_the_real_cli(self):
        self.assertEqual(self.proxy.chat("e2e-par warm up", model="sonnet")[0], 200)

        def talk(name):
            messages = []
            for n in range(3):
                messages.append({"role": "user", "content": "e2e-par %s %d" % (name, n)})
                status, _, body = self.proxy.request("POST", "/v1/chat/completions", {
                    "model": "sonnet", "messages": messages})
                assert status == 200, body
                messages.append(body["choices"][0]["message"])

        self.assertEqual(in_parallel(talk, ("ada", "bob")), [])
        for body in self.api.requests:
            said = json.dumps(body["messages"])
            self.assertFalse("e2e-par ada" in said and "e2e-par bob" in said)
        # An edited first message and a regenerated last answer are answered as asked.
        edited = [{"role": "user", "content": "e2e-par edited 0"},
                  {"role": "assistant", "content": "Hello from the fake API."},
                  {"role": "user", "content": "e2e-par edited 1 [[api:words:3]]"}]
        status, _, body = self.proxy.request("POST", "/v1/chat/completions", {
            "model": "sonnet", "messages": edited})
        self.assertEqual((status, body["choices"][0]["message"]["content"]), (200, "w0 w1 w2"))
        sent, _ = self.api_request("e2e-par edited 1")
        self.assertEqual(sent["messages"][0]["content"], "e2e-par edited 0")
        status, _, again = self.proxy.request("POST", "/v1/chat/completions", {
            "model": "sonnet", "messages": edited})
        self.assertEqual(again["choices"][0]["message"]["content"], "w0 w1 w2")
        wait_until(lambda: not self.proxy.server.processes)
        self.assertEqual(session_files(self.home), [])

    # Every hook event; a -p run fires SessionStart, UserPromptSubmit, Stop and SessionEnd.
    HOOK_EVENTS = ("SessionStart", "UserPromptSubmit", "Stop", "SessionEnd", "PreToolUse",
                   "PostToolUse", "PostToolUseFailure", "Notification", "SubagentStart",
                   "SubagentStop", "PreCompact", "PermissionRequest", "Setup")
    MARKERS = {"memory": "MEMORY-MARKER-7f3a", "style": "STYLE-MARKER-51c2",
               "agent": "AGENT-MARKER-9d1e", "skill": "SKILL-MARKER-44aa",
               "command": "COMMAND-MARKER-0b0b", "settings env": "SETTINGS-ENV-MARKER-c3c3",
               "project memory": "PROJECT-MEMORY-MARKER-e0e0", "agents.md": "AGENTS-MD-MARKER-1212"}

    def customized_home(self):
        """(HOME, a directory above the CLI's working directory, a witness directory): one of
        every kind of Claude Code setup, each with its own marker, in the user's scope and in
        the project scope around the working directory; hooks and MCP servers leave a file in
        the witness directory when they run."""
        root = tempfile.mkdtemp(prefix="proxy-e2e-custom-")
        self.addCleanup(shutil.rmtree, root, True)
        home, project, witness = (os.path.join(root, name) for name in ("home", "tmp", "witness"))
        marker = self.MARKERS
        files = {
            "home/.claude/CLAUDE.md": marker["memory"] + ": the user's private notes",
            "home/.claude/output-styles/marker.md": "---\nname: marker-style\ndescription: x\n"
                                                     "---\n%s answer like a pirate" % marker["style"],
            "home/.claude/agents/marker-agent.md": "---\nname: marker-agent\ndescription: %s\n"
                                                    "---\nbody" % marker["agent"],
            "home/.claude/skills/marker-skill/SKILL.md": "---\nname: marker-skill\ndescription: "
                                                          "%s\n---\nbody" % marker["skill"],
            "home/.claude/commands/markercmd.md": marker["command"],
            "tmp/CLAUDE.md": marker["project memory"],
            "tmp/AGENTS.md": marker["agents.md"],
        }

        def hooks(prefix):
            return {event: [{"matcher": "*", "hooks": [{"type": "command", "command": "touch %s"
                             % os.path.join(witness, prefix + event)}]}]
                    for event in self.HOOK_EVENTS}

        def mcp(name):
            return {"mcpServers": {name: {"type": "stdio", "command": "sh", "args": [
                "-c", "touch %s; sleep 5" % os.path.join(witness, name)]}}}

        files["home/.claude/settings.json"] = json.dumps({
            "hooks": hooks("user-"), "outputStyle": "marker-style",
            "env": {"ANTHROPIC_CUSTOM_HEADERS": "x-marker: " + marker["settings env"]}})
        files["home/.claude.json"] = json.dumps(mcp("user-mcp"))
        files["tmp/.claude/settings.json"] = json.dumps({"hooks": hooks("project-")})
        files["tmp/.claude/settings.local.json"] = json.dumps({"hooks": hooks("local-")})
        files["tmp/.mcp.json"] = json.dumps(mcp("project-mcp"))
        os.mkdir(witness)
        for name, text in files.items():
            path = os.path.join(root, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
        return home, project, witness

    def through_customized_home(self, tools=None, **overrides):
        """Three requests with the same model and system message (the first two identical),
        then the first one's conversation continued (a resumed session), through a proxy whose
        user has customized_home() and whose working directory is below its project directory:
        (the markers that reached the API, witness files, files that the later requests added
        under ~/.claude, the first three API requests, the fourth)."""
        home, project, witness = self.customized_home()

        def names_under(path):
            return {os.path.relpath(os.path.join(d, f), path)
                    for d, dirs, fs in os.walk(path) for f in dirs + fs}

        with mock.patch.dict(os.environ, {"HOME": home}), \
                mock.patch.object(tempfile, "tempdir", project):
            p = Proxy(claude_bin=self.claude, timeout=120.0, idle_timeout=60.0, **overrides)
            self.addCleanup(p.close)
            after = []
            conversation = [{"role": "user", "content": "iso-same"},
                            {"role": "assistant", "content": "Hello from the fake API."},
                            {"role": "user", "content": "iso-resumed"}]
            for prompt in ("iso-same", "iso-same", "iso-other", conversation):
                messages = prompt if isinstance(prompt, list) else [
                    {"role": "user", "content": prompt}]
                status, _, body = p.request("POST", "/v1/chat/completions", dict({
                    "model": "sonnet", "messages": [{"role": "system", "content": "Be brief."}] +
                    messages}, **({"tools": tools} if tools else {})))
                self.assertEqual(status, 200, body)
                self.assertEqual(body["choices"][0]["message"]["content"],
                                 "Hello from the fake API.")
                # The answer comes before the CLI has exited; its live files go when it does.
                wait_until(lambda: not p.server.processes, what="the CLI to exit")
                after.append(names_under(os.path.join(home, ".claude")))
        seen = json.dumps([self.api.requests, self.api.request_headers])
        self.assertEqual(len(self.api.requests), 4)
        resumed = self.api.requests[3]
        # (With --user-settings and an output style, the CLI reminds of the style after them.)
        self.assertEqual([m["role"] for m in resumed["messages"]][:4],
                         ["user", "system", "assistant", "user"], "the conversation's turns")
        self.assertEqual(p.server.sessions.resumed, 1)
        # The CLI rewrites its own files through a temporary "<name>.tmp.<hex>" and a rename;
        # on a loaded machine one was seen left (its plugin store, which every run of the CLI
        # rewrites, the user's own included): such a copy of a file it already had is not one
        # a request added.
        rewrites = {name for name in after[-1] - after[0]
                    if re.sub(r"\.tmp\.[0-9a-f]+$", "", name) in after[0] - {name}}
        return types.SimpleNamespace(
            arrived={what for what, marker in self.MARKERS.items() if marker in seen},
            witnesses=sorted(os.listdir(witness)), added=after[-1] - after[0] - rewrites,
            memory=sorted(f for f in after[-1] if f.startswith("projects")),
            sent=self.api.requests[:3])

    def assert_same_prompt_prefix(self, sent):
        """Two identical requests send identical system prompts, and what the CLI adds after
        the user's message (working directory, date) is identical. Another user message changes
        only the CLI's attribution line, which it derives from that message's characters."""
        def attribution(block):
            return block["text"].startswith("x-anthropic-billing-header:")

        same, again, other = sent
        self.assertEqual(same["system"], again["system"])
        self.assertIn("Be brief.", json.dumps(same["system"]))
        self.assertEqual([b for b in same["system"] if not attribution(b)],
                         [b for b in other["system"] if not attribution(b)])
        self.assertEqual([m for m in same["messages"] if m["role"] != "user"],
                         [m for m in other["messages"] if m["role"] != "user"])

    def test_api_callers_get_none_of_the_users_claude_setup(self):
        run = self.through_customized_home()
        self.assertEqual(run.arrived, set(), "markers that reached the Messages API")
        self.assertEqual(run.witnesses, [], "hooks or MCP servers that ran")
        self.assertEqual(run.added, set(), "files a request added under ~/.claude")
        self.assertEqual(run.memory, [], "auto-memory directories under ~/.claude/projects")
        self.assert_same_prompt_prefix(run.sent)
        self.assertEqual(run.sent[0].get("tools") or [], [])

    def test_with_tools_none_of_the_users_claude_setup_either(self):
        """A request with tools runs without --safe-mode (it would turn the bridge off): the
        rest still keeps everything of the user's out."""
        run = self.through_customized_home(tools=[{"type": "function", "function": {
            "name": "get_weather", "parameters": {"type": "object"}}}])
        self.assertEqual(run.arrived, set(), "markers that reached the Messages API")
        self.assertEqual(run.witnesses, [], "hooks or MCP servers that ran")
        self.assertEqual(run.added, set(), "files a request added under ~/.claude")
        self.assertEqual(run.memory, [], "auto-memory directories under ~/.claude/projects")
        self.assert_same_prompt_prefix(run.sent)
        self.assertEqual([t["name"] for t in run.sent[0]["tools"]], ["mcp__proxy__get_weather"])

    def test_tool_calls_through_the_real_cli(self):
        """The model (the fake API) calls the offered mcp__proxy__get_weather: the client gets
        get_weather with the exact arguments, the CLI run ends at the call (one API request,
        no process left), and the follow-up with the result gets the final answer."""
        weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}}}}
        prompt = 'e2e-tools [[api:call:get_weather:{"city": "Paris", "unit": "C"}]]'
        body = {"model": "sonnet", "messages": [{"role": "user", "content": prompt}],
                "tools": [weather]}
        with self.assertLogs("claude_max_proxy", "INFO") as logs:
            status, _, answer = self.proxy.request("POST", "/v1/chat/completions", body)
            wait_until(lambda: [line for line in logs.output if answer["id"] in line],
                       what="the request's log line")
        self.assertEqual(status, 200, answer)
        # Ended at the call by SIGTERM, in time: a CLI whose output pipes were closed under it
        # took 2 s to exit and had to be killed.
        self.assertIn(" cli=stopped ", [line for line in logs.output if answer["id"] in line][0])
        message = answer["choices"][0]["message"]
        self.assertEqual(answer["choices"][0]["finish_reason"], "tool_calls")
        self.assertEqual(message["content"], "Let me check.")
        call = message["tool_calls"][0]
        self.assertEqual((call["function"]["name"], json.loads(call["function"]["arguments"])),
                         ("get_weather", {"city": "Paris", "unit": "C"}))
        self.assertEqual(len(self.api.requests), 1, "no second request for the denied call")
        self.assertEqual([t["name"] for t in self.api.requests[0]["tools"]],
                         ["mcp__proxy__get_weather"])
        wait_until(lambda: not self.proxy.server.processes, what="the CLI to be gone")
        body["messages"] += [message, {"role": "tool", "tool_call_id": call["id"],
                                       "content": "sunny"}]
        status, _, answer = self.proxy.request("POST", "/v1/chat/completions", body)
        self.assertEqual((status, answer["choices"][0]["message"]["content"]),
                         (200, "Hello from the fake API."))
        self.assertIn("sunny", json.dumps(self.api.requests[-1]["messages"]))
        # Streamed, and through the other two dialects.
        self.api.requests.clear()
        self.api.usages.clear()
        events = parse_sse(self.proxy.request("POST", "/v1/chat/completions", dict(
            body, messages=body["messages"][:1], stream=True))[2])
        calls, finish = ChatClient().streamed_calls(events)
        self.assertEqual(([(n, a) for _, n, a in calls], finish),
                         ([("get_weather", {"city": "Paris", "unit": "C"})], "tool"))
        status, _, answer = self.proxy.request("POST", "/v1/messages", MessagesClient().with_tools(
            MessagesClient().body(prompt), [("get_weather", "", weather["function"]["parameters"])]))
        self.assertEqual(MessagesClient().calls(answer)[1], "tool")
        self.assertEqual(MessagesClient().calls(answer)[0][0][1:],
                         ("get_weather", {"city": "Paris", "unit": "C"}))
        status, _, answer = self.proxy.request("POST", "/v1/responses", ResponsesClient().with_tools(
            ResponsesClient().body(prompt, stream=True), [("get_weather", "", {})]))
        calls, finish = ResponsesClient().streamed_calls(parse_named_sse(answer))
        self.assertEqual(([(n, a) for _, n, a in calls], finish),
                         ([("get_weather", {"city": "Paris", "unit": "C"})], "tool"))
        status, _, answer = self.proxy.request("POST", "/v1/responses", {
            "model": "sonnet", "input": 'e2e-custom [[api:call:apply_patch:{"input": "*** Begin '
                                        'Patch"}]]', "tools": [{
                "type": "custom", "name": "apply_patch", "description": "Patch files.",
                "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}}]})
        self.assertEqual([(i["type"], i["name"], i["input"]) for i in answer["output"]
                          if i["type"] != "message"],
                         [("custom_tool_call", "apply_patch", "*** Begin Patch")])
        sent, _ = self.api_request("e2e-custom")
        self.assertEqual(sent["tools"][0]["input_schema"], proxy.CUSTOM_TOOL_SCHEMA)
        self.assertEqual(len(self.api.requests), 4, "one API request per tool turn")
        wait_until(lambda: not self.proxy.server.processes, what="the CLI to be gone")
        wait_until(lambda: not bridges_running(self.proxy.server.workdir),
                   what="the CLI's bridge processes to end")
        # The CLI logs each bridge connection to a file of its own, kept for a month: removed.
        # (Its folder is named after the working directory; other CLIs' are not ours.)
        logs = self.proxy.server.sessions.logs()
        self.assertFalse(os.path.exists(logs))
        if not os.environ.get("XDG_CACHE_HOME"):
            root = os.path.join(self.home, ".cache", "claude-cli-nodejs")
            self.assertEqual(os.path.dirname(logs), root)
            self.assertEqual([d for d in os.listdir(root) if "claude-max-proxy" in d], [])

    def test_structured_output_through_the_real_cli(self):
        schema = {"type": "object", "properties": {"name": {"type": "string"}},
                  "required": ["name"]}
        status, _, answer = self.proxy.request("POST", "/v1/chat/completions", {
            "model": "sonnet", "messages": [{"role": "user", "content":
                                             'e2e-schema [[api:call:StructuredOutput:{"name": "Ada"}]]'}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "person",
                                                                       "schema": schema}}})
        self.assertEqual(status, 200, answer)
        self.assertEqual(json.loads(answer["choices"][0]["message"]["content"]), {"name": "Ada"})
        sent, _ = self.api_request("e2e-schema")
        structured = [t for t in sent["tools"] if t["name"] == "StructuredOutput"]
        self.assertEqual(structured[0]["input_schema"], schema)
        self.assertEqual(len(self.api.requests), 1)

    def test_json_the_model_writes_as_text_is_the_answer_in_every_dialect(self):
        """The model answers in plain text rather than through StructuredOutput (the real CLI
        nudges it once, then ends with the text as its result): valid JSON is the answer
        (instructor's Mode.JSON, DSPy's JSONAdapter); text that is no JSON is still a 502."""
        schema = {"type": "object", "properties": {"name": {"type": "string"}},
                  "required": ["name"]}
        prompt = 'e2e-json-text [[api:reply:{"name": "Ada"}]]'
        bodies = {
            "/v1/chat/completions": {"model": "sonnet", "messages": [
                {"role": "system", "content": "Answer as JSON with a name."},
                {"role": "user", "content": prompt}], "response_format": {"type": "json_object"}},
            "/v1/messages": {"model": "sonnet", "max_tokens": 100, "messages": [
                {"role": "user", "content": prompt}], "output_format": {
                    "type": "json_schema", "schema": schema}},
            "/v1/responses": {"model": "sonnet", "input": prompt, "text": {"format": {
                "type": "json_schema", "name": "person", "schema": schema}}}}
        for path, body in bodies.items():
            for stream in (False, True):
                status, _, answer = self.proxy.request("POST", path, dict(body, stream=stream))
                self.assertEqual(status, 200, (path, answer))
                if stream:  # the JSON text, quoted in a JSON event
                    self.assertIn(json.dumps('{"name": "Ada"}')[1:-1], answer.decode(), path)
                    continue
                text = answer["choices"][0]["message"]["content"] if "choices" in answer else \
                    answer["content"][0]["text"] if "content" in answer else \
                    answer["output"][-1]["content"][0]["text"]
                self.assertEqual(json.loads(text), {"name": "Ada"}, path)
        status, _, answer = self.proxy.request("POST", "/v1/chat/completions", {
            "model": "sonnet", "messages": [{"role": "user", "content": "e2e-json-none"}],
            "response_format": {"type": "json_object"}})
        self.assertEqual((status, answer["error"]["code"]), (502, "invalid_structured_output"))

    def test_the_subscription_login_still_authenticates(self):
        """OAuth credentials are not settings: --safe-mode --setting-sources "" keeps them."""
        home = tempfile.mkdtemp(prefix="proxy-e2e-login-")
        self.addCleanup(shutil.rmtree, home, True)
        os.makedirs(os.path.join(home, ".claude"))
        credentials = os.path.join(home, ".claude", ".credentials.json")  # Linux's login
        with open(os.open(credentials, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            json.dump({"claudeAiOauth": {
                "accessToken": "sk-ant-oat01-from-login", "refreshToken": "sk-ant-ort01-x",
                "expiresAt": int(time.time() * 1000) + 3600000,
                "scopes": ["user:inference", "user:profile"], "subscriptionType": "max"}}, f)
        with mock.patch.dict(os.environ, {"HOME": home}):
            del os.environ["ANTHROPIC_API_KEY"]
            status, _, body = self.proxy.chat("login-marker-1")
            with mock.patch.dict(os.environ, {"CLAUDE_CODE_OAUTH_TOKEN": "sk-ant-oat01-env"}):
                status2, _, _ = self.proxy.chat("login-marker-2")
        self.assertEqual((status, status2), (200, 200), body)
        sent = {json.dumps(b["messages"]): h for b, h in zip(self.api.requests,
                                                           self.api.request_headers)}
        auth = [h.get("Authorization") or h.get("authorization") for m, h in sent.items()
                if "login-marker" in m]
        self.assertEqual(auth, ["Bearer sk-ant-oat01-from-login", "Bearer sk-ant-oat01-env"])

    def test_user_settings_opt_in_brings_the_users_own_scope_only(self):
        run = self.through_customized_home(user_settings=True)
        # The test can tell: with the opt-in the user's own setup arrives and their hooks run...
        self.assertLessEqual({"memory", "style", "settings env"}, run.arrived)
        self.assertIn("user-SessionStart", run.witnesses)
        # ...but never the project scope around the working directory, nor auto-memory.
        self.assertEqual(run.arrived & {"project memory", "agents.md"}, set())
        self.assertEqual([w for w in run.witnesses if not w.startswith("user-")], [])
        self.assertEqual(run.memory, [])
        self.assert_same_prompt_prefix(run.sent)

    def test_each_dialect_through_the_real_cli(self):
        status, _, body = self.proxy.request("POST", "/v1/messages", {
            "model": "claude-opus-5-5", "max_tokens": 100, "output_config": {"effort": "high"},
            "messages": [{"role": "user", "content": "[[api:thinking]] e2e-marker-m"}]})
        self.assertEqual(status, 200, body)
        self.assertEqual([(b["type"], b.get("text", b.get("thinking"))) for b in body["content"]],
                         [("thinking", "Let me think."), ("text", "Hello from the fake API.")])
        sent, _ = self.api_request("e2e-marker-m")
        self.assertEqual((sent["model"], sent["output_config"]), ("claude-opus-5-5",
                                                                 {"effort": "high"}))
        conn = self.proxy.connect()
        conn.request("POST", "/v1/messages", body=json.dumps({
            "model": "sonnet", "max_tokens": 100, "stream": True,
            "messages": [{"role": "user", "content": "e2e-marker-ms"}]}),
            headers={"Content-Type": "application/json"})
        events = parse_named_sse(conn.getresponse().read())
        conn.close()
        MessagesClient().check_order(self, events)
        self.assertEqual(MessagesClient().streamed(events),
                         ("Hello from the fake API.", "", "stop", None))
        status, _, body = self.proxy.request("POST", "/v1/responses", {
            "model": "haiku", "input": "e2e-marker-r", "reasoning": {"effort": "minimal"},
            "instructions": "Be brief."})
        self.assertEqual(ResponsesClient().answer(body), ("Hello from the fake API.", "",
                                                          "stop"))
        sent, _ = self.api_request("e2e-marker-r")
        self.assertEqual(sent["output_config"], {"effort": "low"})
        self.assertIn("Be brief.", json.dumps(sent["system"]))

    def test_a_warm_cli_sends_the_api_what_a_fresh_one_sends_in_every_dialect(self):
        """The same requests through a proxy without warm processes and one with them: the
        real CLI sends the API the same request either way (but for the session id in its
        metadata), when the model or system prompt were set on stdin, for tools, and for a
        conversation's turn started ahead; and the clients get the same answers."""
        cold = Proxy(claude_bin=self.claude, timeout=120.0, idle_timeout=60.0, warm=0)
        self.addCleanup(cold.close)
        warm = Proxy(claude_bin=self.claude, timeout=120.0, idle_timeout=60.0, warm=3)
        self.addCleanup(warm.close)
        full = [dict(say="learn"), dict(say="learn", model="opus"), dict(say="a"), dict(say="b"),
                dict(say="c", model="opus"), dict(say="d", system="Answer tersely."),
                dict(say="e"), dict(say="f", tools=True), dict(say="g", tools=True)]
        short = [dict(say="a"), dict(say="b"), dict(say="c", model="opus"),
                 dict(say="d", system="Answer tersely.")]
        def api_request(send):
            """The one API request `send()` made the CLI send, without its session id."""
            sent = len(self.api.requests)
            with self.api.lock:
                self.api.prefixes.clear()  # each answer's usage as if it came alone
            send()
            self.assertEqual(len(self.api.requests), sent + 1, "nothing else reached the API")
            return {k: v for k, v in self.api.requests[-1].items() if k != "metadata"}

        def settle(p):
            wait_until(p.server.warm.settled, timeout=30, what="warm CLIs to start")

        for dialect, steps in (("chat", full), ("messages", short), ("responses", short)):
            steps = [dict(step, say="%s e2e-warm-%s" % (step["say"], dialect)) for step in
                     steps + [dict(say="turn %d" % n, turn=True) for n in range(4)]]
            took = warm_or_cold(self, cold, warm, dialect, steps, api_request, settle)
            expected = {"b", "c", "d", "turn 2", "turn 3"} | (
                {"e", "g"} if dialect == "chat" else set())
            self.assertLessEqual(expected, set(took), dialect)

    def test_the_real_cli_as_a_client_of_messages(self):
        """Claude Code itself pointed at the proxy (ANTHROPIC_BASE_URL), its own CLI behind it."""
        client_home = tempfile.mkdtemp(prefix="proxy-e2e-client-")
        self.addCleanup(shutil.rmtree, client_home, True)
        env = dict(os.environ, HOME=client_home, ANTHROPIC_API_KEY="sk-ant-dummy",
                   ANTHROPIC_BASE_URL="http://127.0.0.1:%d" % self.proxy.port)

        def client(*flags):  # the prompt on stdin: --tools takes every word after it
            done = subprocess.run([self.claude, "-p", "--output-format", "json", "--safe-mode",
                                   "--setting-sources", "", *flags], input=b"client-marker",
                                  env=env, capture_output=True, timeout=120, cwd=client_home)
            self.assertTrue(done.stdout, done.stderr)
            return json.loads(done.stdout)
        result = client("--tools", "")
        self.assertEqual((result["is_error"], result["result"]),
                         (False, "Hello from the fake API."), result)
        sent, _ = self.api_request("client-marker")
        self.assertEqual(sent["model"], "claude-opus-5-5", "its default model, by full id")
        # With its ~20 built-in tools, offered through the bridge: the model's call of Read goes
        # back to the client, which runs it itself and asks again with the file's text.
        note = os.path.join(client_home, "note.txt")
        with open(note, "w") as f:
            f.write("secret-note-42")
        self.api.requests.clear()
        self.api.usages.clear()
        done = subprocess.run(
            [self.claude, "-p", "--output-format", "json", "--safe-mode", "--setting-sources",
             "", "--allowedTools", "Read"],
            input=('client-tools [[api:call:Read:{"file_path": "%s"}]]' % note).encode(),
            env=env, capture_output=True, timeout=120, cwd=client_home)
        result = json.loads(done.stdout)
        self.assertEqual((result["is_error"], result["result"], result["num_turns"]),
                         (False, "Hello from the fake API.", 2), result)
        first, second = self.api.requests
        offered = [t["name"] for t in first["tools"]]
        self.assertIn("mcp__proxy__Read", offered)
        self.assertIn("mcp__proxy__Bash", offered, "all of the client's tools")
        self.assertFalse([n for n in offered if not n.startswith("mcp__proxy__")], offered)
        self.assertIn("secret-note-42", json.dumps(second["messages"]),
                      "the client ran Read and sent its result")

    def test_api_errors_become_http_errors(self):
        for marker, status, code in [("[[api:err401]]", 401, "claude_not_logged_in"),
                                     ("[[api:toolong]]", 400, "context_length_exceeded"),
                                     ("[[api:err529]]", 503, "overloaded")]:
            got, _, body = self.proxy.chat(marker)
            self.assertEqual((got, body["error"]["code"]), (status, code), body)
            got, _, body = self.proxy.stream(marker)
            self.assertEqual(got, status, body)

    # Credentials as a subscription login presents them: the CLI then reports rate limits.
    SUBSCRIPTION = {"ANTHROPIC_API_KEY": None, "CLAUDE_CODE_OAUTH_TOKEN": "sk-ant-oat01-dummy"}
    SUBSCRIPTION_ENV = {"CLAUDE_CODE_OAUTH_TOKEN": "sk-ant-oat01-dummy"}

    def test_the_subscription_is_learnt_served_and_protected_on_a_claude_ai_login(self):
        """The real CLI on a (dummy) OAuth token reports the API's unified rate-limit headers
        as rate_limit_event lines: the daemon learns the windows, serves them, keeps the
        reserve and refuses extra usage without sending anything to the API."""
        now = int(time.time())
        unified = {"status": "allowed_warning", "reset": now + 3600,
                   "5h-utilization": "0.91", "5h-reset": now + 3600, "5h-status":
                   "allowed_warning", "5h-surpassed-threshold": "0.9", "7d-utilization": "0.4",
                   "7d-reset": now + 86400, "7d-status": "allowed", "overage-status": "allowed",
                   "representative-claim": "five_hour"}
        tmp = tempfile.mkdtemp(prefix="proxy-e2e-usage-")
        self.addCleanup(shutil.rmtree, tmp, True)
        self.addCleanup(self.api.unified.clear)
        with mock.patch.dict(os.environ, self.SUBSCRIPTION_ENV), \
                mock.patch.object(tempfile, "tempdir", tmp):
            del os.environ["ANTHROPIC_API_KEY"]
            p = Proxy(claude_bin=self.claude, timeout=120.0, idle_timeout=60.0, reserve=5)
            self.addCleanup(p.close)
            p.server.login.check()
            health = p.request("GET", "/health")[2]
            self.assertEqual((health["status"], health["claude"]["logged_in"],
                              health["claude"]["auth_method"]), ("ok", True, "oauth_token"))
            self.api.unified.update(("anthropic-ratelimit-unified-" + k, str(v))
                                    for k, v in unified.items())
            status, _, body = p.chat("e2e-usage-1")
            self.assertEqual(status, 200, body)
            usage = p.request("GET", "/v1/usage")[2]
            self.assertEqual(usage["auth"], {"logged_in": True, "method": "oauth_token"})
            self.assertEqual((usage["status"], usage["windows"]), ("allowed_warning", {
                "five_hour": {"utilization": 0.91, "resets_at": now + 3600,
                              "status": "allowed_warning", "surpassed_threshold": 0.9},
                "seven_day": {"utilization": 0.4, "resets_at": now + 86400,
                              "status": "allowed"}}))
            self.assertEqual(usage["totals"]["requests"], 1)
            self.assertGreater(usage["totals"]["api_equivalent_usd"], 0)
            status, response, _ = p.request("POST", "/v1/messages", {
                "model": "sonnet", "max_tokens": 20,
                "messages": [{"role": "user", "content": "e2e-usage-2"}]})
            self.assertEqual(response.getheader("anthropic-ratelimit-unified-5h-utilization"),
                             "0.91")
            # At 96% with 5% kept for the user: refused, and the API hears nothing of it.
            self.api.unified["anthropic-ratelimit-unified-5h-utilization"] = "0.96"
            self.assertEqual(p.chat("e2e-usage-3")[0], 200)
            sent = len(self.api.requests)
            status, response, body = p.chat("e2e-usage-4")
            self.assertEqual((status, body["error"]["code"]), (429, "usage_reserve"))
            self.assertTrue(3500 <= int(response.getheader("Retry-After")) <= 3600)
            self.assertEqual(len(self.api.requests), sent, "nothing reached the API")
            # The plan's limit reached and the account in extra usage: that answer is given,
            # the next ones are refused.
            self.api.unified.update({"anthropic-ratelimit-unified-status": "rejected",
                                     "anthropic-ratelimit-unified-5h-utilization": "1"})
            p.server.subscription.reserve = 0
            with self.assertLogs("claude_max_proxy", "WARNING"):
                self.assertEqual(p.chat("e2e-usage-5")[0], 200)
            self.assertEqual(p.request("GET", "/v1/usage")[2]["overage"],
                             {"status": "allowed", "in_use": True})
            sent = len(self.api.requests)
            status, _, body = p.chat("e2e-usage-6")
            self.assertEqual((status, body["error"]["code"]), (429, "extra_usage"))
            self.assertEqual(len(self.api.requests), sent)
            # The API's own refusal of a request only extra usage could pay for.
            p.server.subscription.allow_extra_usage = True
            for marker in ("[[api:third_party]]", "[[api:long_context]]"):
                status, _, body = p.chat("e2e-usage-7 " + marker)
                self.assertEqual((status, body["error"]["code"]), (400, "extra_usage_required"))
                self.assertNotIn("API Error", body["error"]["message"])

    def test_a_subscription_at_its_limit_is_429_with_retry_after(self):
        with mock.patch.dict(os.environ, {"CLAUDE_CODE_OAUTH_TOKEN": "sk-ant-oat01-dummy"}):
            del os.environ["ANTHROPIC_API_KEY"]
            status, response, body = self.proxy.chat("[[api:err429]]")
            self.assertEqual((status, body["error"]["code"]), (429, "rate_limit_exceeded"))
            self.assertTrue(250 <= int(response.getheader("Retry-After")) <= 300)
            status, _, body = self.proxy.stream("[[api:err429]]")
            self.assertEqual(status, 429)
            status, _, body = self.proxy.chat("e2e-marker-10")
            self.assertEqual(status, 200)

    def run_real_cli(self, prompt, fields=None, **env):
        """The real CLI run exactly as the proxy runs it, without the proxy: its stdout lines.
        `fields`: more of the Chat request (tools, response_format)."""
        launch = launch_for(prompt, self.claude, model="sonnet", **(fields or {}))
        run_env = {k: v for k, v in os.environ.items() if k not in env or env[k] is not None}
        run_env.update({k: v for k, v in env.items() if v is not None})
        paths = {}
        for name, text in launch.files().items():
            paths[name] = os.path.join(self.home, "run-%s.txt" % name)
            with open(paths[name], "w") as f:
                f.write(text)
        done = subprocess.run(launch.argv(paths), input=launch.stdin(), capture_output=True,
                              env=launch.environment(run_env), cwd=self.home, timeout=120)
        return [json.loads(line) for line in done.stdout.decode().splitlines() if line.strip()]

    def test_the_fake_speaks_like_the_real_cli_with_tools(self):
        """Tool calls through the bridge and structured output, line for line and key for key
        (one call: the CLI's denial lines of parallel calls interleave as they happen)."""
        weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}}}}
        schema = {"type": "json_schema", "json_schema": {"name": "n", "schema": {
            "type": "object", "properties": {"name": {"type": "string"}}}}}
        cases = [
            ('e2e [[api:call:get_weather:{"city": "Paris"}]]',
             '[[fake:reply:Let me check.]][[fake:call:get_weather:{"city": "Paris"}]]',
             {"tools": [weather]}),
            ('e2e [[api:call:StructuredOutput:{"name": "Ada"}]]',
             '[[fake:reply:Let me check.]][[fake:structured:{"name": "Ada"}]]',
             {"response_format": schema}),
            ("e2e no json", "no json", {"response_format": schema}),
            ("e2e no json", "no json", {"response_format": schema, "tools": [weather]})]
        for api_prompt, fake_prompt, fields in cases:
            real = self.run_real_cli(api_prompt, fields)
            argv = launch_for("x", self.claude, model="sonnet", **fields).argv({"tools": "t"})
            opts, _ = fake.parse(argv[1:])
            fake.MCP_TOOLS[:] = [{"server": "proxy", "name": "mcp__proxy__get_weather"}] \
                if "tools" in fields else []
            try:
                os.environ["CLAUDE_CODE_DISABLE_AUTO_MEMORY"] = "1"  # as the launch sets it
                ours = [fake.init_line(opts, "claude-sonnet-5-5")]
                ours = [fake.ui_invalidate()] if opts.get("--safe-mode") else []
                ours.append(fake.init_line(opts, "claude-sonnet-5-5"))
                for line in fake.scenario(fake_prompt, "claude-sonnet-5-5", opts):
                    ours.extend(fake.message_events(*line[1:]) if isinstance(line, tuple)
                                else [line])
            finally:
                fake.MCP_TOOLS[:] = []
                del os.environ["CLAUDE_CODE_DISABLE_AUTO_MEMORY"]
            assert_same_lines(self, tool_results_after_the_stream(ours),
                              tool_results_after_the_stream(real), api_prompt)
            init = [line for line in real if line.get("subtype") == "init"][0]
            self.assertEqual(init["tools"], [line for line in ours if line.get(
                "subtype") == "init"][0]["tools"], api_prompt)

    def test_the_fake_speaks_like_the_real_cli(self):
        """The fake claude, line kind for line kind and key for key, against the live CLI in
        the proxy's own mode. When a new CLI changes its output, this is the test that says so."""
        cases = [("e2e hi", "hi", {}), ("[[api:max_tokens]]", "[[fake:max_tokens]]", {}),
                 ("[[api:always_max_tokens]]", "[[fake:always_max_tokens]]", {}),
                 ("[[api:err401]]", "[[fake:err401]]", {}),
                 ("[[api:toolong]]", "[[fake:toolong]]", {}),
                 ("[[api:err529]]", "[[fake:err529]]", {}),
                 ("no key", "[[fake:notloggedin]]", {"ANTHROPIC_API_KEY": None}),
                 ("e2e hi", "[[fake:ratelimit_info]]", self.SUBSCRIPTION),
                 ("[[api:err429]]", "[[fake:ratelimit:300]]", self.SUBSCRIPTION),
                 ("[[api:third_party]]", "[[fake:third_party]]", self.SUBSCRIPTION),
                 ("[[api:long_context]]", "[[fake:long_context]]", {}),
                 ("[[api:thinking]]", "[[fake:thinking]]", {})]
        # The API stream breaks after 5 of 12 words: what the CLI does to recover.
        for api, ours, retries in self.BROKEN_STREAMS:
            cases.append(("[[api:words:12]] [[api:cut:5]] " + api,
                          "[[fake:words:12]][[fake:cut:5]]" + ours,
                          {"CLAUDE_CODE_MAX_RETRIES": retries}))
        opts = {"--tools": "", "--disable-slash-commands": True, "--safe-mode": True}
        for api_prompt, fake_prompt, env in cases:
            self.api.requests.clear()
            self.api.usages.clear()
            real = self.run_real_cli(api_prompt, **env)
            with mock.patch.dict(os.environ, {k: v for k, v in env.items() if v is not None}):
                ours = [fake.ui_invalidate(), fake.init_line(opts, "claude-sonnet-5-5")] + \
                    fake_lines(fake_prompt)
            assert_same_lines(self, ours, real, api_prompt)
            # How it recovered from a broken stream: which blocks it gave up, and its API calls
            # (streamed, or whole without streaming) in order.
            self.assertEqual(recovery(ours), recovery(real), api_prompt)
            if "[[api:cut:" in api_prompt:  # (an error answer starts no message)
                self.assertEqual([bool(r.get("stream")) for r in self.api.requests],
                                 calls_made(ours), api_prompt)

    # (the test API's markers, the fake's, CLAUDE_CODE_MAX_RETRIES): every call breaks, with
    # and without retries; only the first call breaks; thinking survives and the CLI resumes;
    # thinking survives and every call breaks, until the CLI gives up.
    BROKEN_STREAMS = [("", "", "0"), ("", "", "2"), ("[[api:cuts:1]]", "[[fake:cuts:1]]", "2"),
                      ("[[api:thinking]] [[api:cuts:1]]", "[[fake:thinking]][[fake:cuts:1]]", "0"),
                      ("[[api:thinking]]", "[[fake:thinking]]", "0")]

    def test_a_broken_api_stream_gives_the_whole_answer_once(self):
        words = " ".join("w%d" % i for i in range(12))
        for api, _, retries in self.BROKEN_STREAMS[:4]:
            prompt = "[[api:words:12]] [[api:cut:5]] " + api
            where = "%s with %s retries" % (prompt, retries)
            with mock.patch.dict(os.environ, {"CLAUDE_CODE_MAX_RETRIES": retries}):
                status, _, body = self.proxy.chat(prompt)
                stream_status, _, events = self.proxy.stream(prompt)
            self.assertEqual((status, body["choices"][0]["message"]["content"]), (200, words),
                             where)
            self.assertEqual(body["usage"]["completion_tokens"], 9, "the final call's")
            self.assertEqual((stream_status, events[-1]), (200, "[DONE]"), where)
            self.assertEqual("".join(c["choices"][0]["delta"].get("content", "")
                                     for c in events[:-1]), words, where)

    def test_a_broken_api_stream_that_never_recovers_is_an_error(self):
        prompt = "[[api:thinking]] [[api:words:12]] [[api:cut:5]]"
        status, _, body = self.proxy.chat(prompt)
        self.assertEqual(status, 502, body)
        self.assertIn("Connection lost mid-response", body["error"]["message"])
        status, _, events = self.proxy.stream(prompt)
        self.assertEqual((status, "".join(c["choices"][0]["delta"].get("content", "")
                                          for c in events[:-1])), (200, "w0 w1 w2 w3 w4"))
        self.assertIn("Connection lost mid-response", events[-1]["error"]["message"])

    def test_a_retry_with_other_words_ends_the_stream_with_an_error(self):
        prompt = "[[api:words:12]] [[api:cut:5]] [[api:differ]]"
        status, _, body = self.proxy.chat(prompt)
        self.assertEqual((status, body["choices"][0]["message"]["content"]),
                         (200, " ".join("v%d" % i for i in range(12))))
        status, _, events = self.proxy.stream(prompt + " streamed")  # its own first call
        self.assertEqual(status, 200)
        self.assertNotIn("[DONE]", events)
        self.assertEqual(events[-1]["error"]["code"], "answer_changed")
        self.assertEqual("".join(c["choices"][0]["delta"].get("content", "")
                                 for c in events[:-1]), "w0 w1 w2 w3 w4")

    def test_max_tokens_through_the_real_cli(self):
        # The API stops at max_tokens; the CLI would ask for the rest, but a client limit ends it.
        status, _, body = self.proxy.chat("[[api:max_tokens]] e2e-marker-6", max_tokens=5)
        self.assertEqual(status, 200, body)
        self.assertEqual((body["choices"][0]["message"]["content"],
                          body["choices"][0]["finish_reason"]), ("Hello from the fake API.",
                                                                 "length"))
        # Without a client limit the resumed answer is joined, and if the CLI gives up after
        # resuming three times, the client still gets the text, with finish_reason length.
        status, _, body = self.proxy.chat("[[api:max_tokens]] e2e-marker-7")
        self.assertEqual((body["choices"][0]["message"]["content"],
                          body["choices"][0]["finish_reason"]),
                         ("Hello from the fake API." * 2, "stop"))
        status, _, body = self.proxy.chat("[[api:always_max_tokens]] e2e-marker-8")
        self.assertEqual((status, body["choices"][0]["finish_reason"]), (200, "length"))
        self.assertEqual(body["choices"][0]["message"]["content"], "Hello from the fake API." * 4)

    def test_disconnect_ends_the_real_cli(self):
        s = send_chat(self.proxy.port, {"model": "sonnet", "stream": True, "messages": [
            {"role": "user", "content": "[[api:hold]] e2e-marker-5"}]})
        received = b""
        while b'"Hello"' not in received:
            received += s.recv(65536)
        pids = [p.pid for p in self.proxy.server.processes]
        self.assertEqual(len(pids), 1)
        s.close()
        wait_until(lambda: not alive(pids[0]), what="the real CLI to end")
        self.api.release.set()
        wait_until(lambda: not self.proxy.server.processes, what="the proxy to forget it")

    def test_sigterm_ends_the_real_cli_and_all_it_started(self):
        if children_of(os.getpid()) is None:
            self.skipTest("needs /proc to find the daemon's descendants")
        daemon, port = start_daemon(self, "--shutdown-grace", "0.5", claude_bin=self.claude,
                                    env=dict(os.environ))
        s = send_chat(port, {"model": "sonnet", "stream": True, "messages": [
            {"role": "user", "content": "[[api:hold]] e2e-marker-6"}]})
        self.addCleanup(self.api.release.set)
        received = b""
        while b'"Hello"' not in received:
            received += s.recv(65536)

        def descendants(pid):
            found = []
            for child, _ in children_of(pid):
                found += [child] + descendants(child)
            return found

        started = descendants(daemon.pid)
        self.assertTrue(started, "the real CLI runs under the daemon")
        daemon.send_signal(signal.SIGTERM)
        self.assertEqual(daemon.wait(30), 0)
        for pid in started:
            wait_until(lambda: not alive(pid), what="process %d to end" % pid)
        with s:
            while not received.endswith(b"0\r\n\r\n"):
                data = s.recv(65536)
                if not data:
                    break
                received += data
        self.assertIn(b'"shutting_down"', received, "the client is told why its answer ended")
        self.assertNotIn("Traceback", daemon.log())


##############################################################################
# The official OpenAI Python SDK as the client
##############################################################################

try:
    import openai
except ImportError:
    openai = None


@unittest.skipUnless(openai is not None or REQUIRE_ALL, "the openai package is not installed")
class OpenAISDKTest(FakeClaudeMixin, unittest.TestCase):
    """What people actually run: openai.OpenAI(base_url=...) against the proxy."""

    def setUp(self):
        super().setUp()
        if openai is None:
            self.fail("PROXY_REQUIRE_ALL=1 but the openai package is not installed")
        self.proxy = self.start_proxy()
        self.client = openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % self.proxy.port,
                                    api_key="not-needed", max_retries=0, timeout=30)
        self.addCleanup(self.client.close)

    WEATHER = {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city.", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    CALLS = ('Paris and Oslo? [[fake:call:get_weather:{"city": "Paris"}]]'
             '[[fake:call:get_weather:{"city": "Oslo"}]]')

    def test_chat_tool_calls_parse_whole_and_streamed(self):
        messages = [{"role": "user", "content": self.CALLS}]
        whole = self.client.chat.completions.create(model="sonnet", messages=messages,
                                                    tools=[self.WEATHER])
        choice = whole.choices[0]
        self.assertEqual(choice.finish_reason, "tool_calls")
        self.assertEqual([(c.type, c.function.name, json.loads(c.function.arguments))
                          for c in choice.message.tool_calls],
                         [("function", "get_weather", {"city": "Paris"}),
                          ("function", "get_weather", {"city": "Oslo"})])
        with self.client.chat.completions.stream(model="sonnet", messages=messages,
                                                 tools=[self.WEATHER]) as stream:
            final = stream.get_final_completion()
        calls = final.choices[0].message.tool_calls
        self.assertEqual([json.loads(c.function.arguments) for c in calls],
                         [{"city": "Paris"}, {"city": "Oslo"}])
        self.assertEqual(final.choices[0].finish_reason, "tool_calls")
        # The results go back as `tool` messages; the answer comes from them.
        follow = self.client.chat.completions.create(model="sonnet", tools=[self.WEATHER],
                                                     messages=messages + [
            choice.message.model_dump(exclude_none=True)] + [
            {"role": "tool", "tool_call_id": c.id, "content": "sunny in " + json.loads(
                c.function.arguments)["city"]} for c in choice.message.tool_calls])
        self.assertEqual(follow.choices[0].message.content, "Tools said: sunny in Oslo")

    def test_structured_output_parses_into_a_model(self):
        import pydantic

        class Person(pydantic.BaseModel):
            name: str
            age: int

        parsed = self.client.chat.completions.parse(
            model="sonnet", response_format=Person, messages=[{"role": "user", "content":
                                                               'Who? [[fake:structured:'
                                                               '{"name": "Ada", "age": 36}]]'}])
        self.assertEqual(parsed.choices[0].message.parsed, Person(name="Ada", age=36))
        schema = json.loads(self.runs()[-1]["argv"][self.runs()[-1]["argv"].index(
            "--json-schema") + 1])
        self.assertEqual(schema["required"], ["name", "age"], "the SDK's strict schema")

    def test_responses_function_calls_parse_whole_and_streamed(self):
        tool = dict(self.WEATHER["function"], type="function")
        whole = self.client.responses.create(model="sonnet", input=self.CALLS, tools=[tool])
        calls = [item for item in whole.output if item.type == "function_call"]
        self.assertEqual([(c.name, json.loads(c.arguments)) for c in calls],
                         [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"})])
        with self.client.responses.stream(model="sonnet", input=self.CALLS,
                                          tools=[tool]) as stream:
            final = stream.get_final_response()
        self.assertEqual([json.loads(i.arguments) for i in final.output
                          if i.type == "function_call"], [{"city": "Paris"}, {"city": "Oslo"}])
        follow = self.client.responses.create(
            model="sonnet", tools=[tool], previous_response_id=whole.id, input=[
                {"type": "function_call_output", "call_id": c.call_id, "output": "rain"}
                for c in calls])
        self.assertEqual(follow.output_text, "Tools said: rain")

    def test_api_keys_and_a_busy_proxy(self):
        p = self.start_proxy(api_keys=["sdk-key"], max_concurrency=1, max_queue=1)
        url = "http://127.0.0.1:%d/v1" % p.port
        with openai.OpenAI(base_url=url, api_key="sdk-key", max_retries=0) as client:
            chunks = list(client.chat.completions.create(
                model="opus", stream=True, messages=[{"role": "user", "content": "hi"}]))
            self.assertEqual("".join(c.choices[0].delta.content or "" for c in chunks
                                     if c.choices), "Hello from the fake API.")
            held = socket.create_connection(("127.0.0.1", p.port))
            data = json.dumps(chat_body("[[fake:gate:held]]")).encode()
            held.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Authorization: Bearer sdk-key\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
            wait_until(lambda: len(self.runs()) == 2, what="the held CLI")
            waiting = threading.Thread(target=lambda: client.chat.completions.create(
                model="opus", messages=[{"role": "user", "content": "waits"}]))
            waiting.start()
            wait_until(lambda: p.server.slots.queued == 1, what="a request to wait")
            with self.assertRaises(openai.RateLimitError) as caught:
                client.chat.completions.create(model="opus", messages=[
                    {"role": "user", "content": "hi"}])
            self.assertEqual(caught.exception.code, "queue_full")
            open(os.path.join(self.log_dir, "held"), "w").close()
            self.assertEqual(read_response(held)[0], 200)
            waiting.join(30)
        with openai.OpenAI(base_url=url, api_key="wrong", max_retries=0) as client:
            with self.assertRaises(openai.AuthenticationError) as caught:
                client.models.list()
            self.assertEqual(caught.exception.code, "invalid_api_key")

    def test_list_and_retrieve_models(self):
        ids = [m.id for m in self.client.models.list()]
        self.assertIn("claude-opus-4", ids)
        self.assertEqual(self.client.models.retrieve("claude-haiku-4").id, "claude-haiku-4")

    def test_chat(self):
        completion = self.client.chat.completions.create(
            model="claude-sonnet-4", messages=[{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "hi [[fake:cache]]"}],
            max_tokens=100, temperature=0.3)
        self.assertEqual(completion.choices[0].message.content, "Hello from the fake API.")
        self.assertEqual(completion.choices[0].message.role, "assistant")
        self.assertEqual(completion.choices[0].finish_reason, "stop")
        self.assertEqual(completion.model, "claude-sonnet-5-5")
        self.assertEqual((completion.usage.prompt_tokens, completion.usage.completion_tokens,
                          completion.usage.prompt_tokens_details.cached_tokens), (20, 9, 5))
        self.assertEqual(self.only_run()["system"], "Be brief.")

    def test_streaming_with_usage(self):
        stream = self.client.chat.completions.create(
            model="openai/claude-opus-4", messages=[{"role": "user", "content": "hi"}],
            stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertEqual(text, "Hello from the fake API.")
        self.assertEqual([c.choices[0].finish_reason for c in chunks if c.choices][-1], "stop")
        self.assertEqual(chunks[-1].choices, [])
        self.assertEqual(chunks[-1].usage.total_tokens, 21)
        self.assertEqual(len({c.id for c in chunks}), 1)

    def test_stream_helper_accumulates(self):
        with self.client.chat.completions.stream(
                model="sonnet", messages=[{"role": "user", "content": "[[fake:reply:a b c]]"}]) as s:
            final = s.get_final_completion()
        self.assertEqual(final.choices[0].message.content, "a b c")

    def test_error_statuses_raise_the_sdk_exceptions(self):
        with self.assertRaises(openai.NotFoundError) as caught:
            self.client.chat.completions.create(model="gpt-4o", messages=[
                {"role": "user", "content": "hi"}])
        self.assertEqual(caught.exception.code, "model_not_found")
        with self.assertRaises(openai.AuthenticationError):
            self.client.chat.completions.create(model="opus", messages=[
                {"role": "user", "content": "[[fake:notloggedin]]"}])
        with self.assertRaises(openai.AuthenticationError):
            list(self.client.chat.completions.create(model="opus", stream=True, messages=[
                {"role": "user", "content": "[[fake:notloggedin]]"}]))
        with self.assertRaises(openai.RateLimitError):
            self.client.chat.completions.create(model="opus", messages=[
                {"role": "user", "content": "[[fake:ratelimit:30]]"}])
        with self.assertRaises(openai.BadRequestError) as caught:
            self.client.chat.completions.create(model="opus", n=2, messages=[
                {"role": "user", "content": "hi"}])
        self.assertEqual(caught.exception.param, "n")

    def test_error_after_the_stream_started_raises_in_the_sdk(self):
        stream = self.client.chat.completions.create(model="opus", stream=True, messages=[
            {"role": "user", "content": "[[fake:diemid]]"}])
        with self.assertRaises(openai.APIError) as caught:
            for _ in stream:
                pass
        self.assertIn("mid-stream", str(caught.exception))

    def test_a_broken_api_stream_as_the_sdk_sees_it(self):
        def streamed(prompt):
            with mock.patch.dict(os.environ, {"CLAUDE_CODE_MAX_RETRIES": "2"}):
                return "".join(chunk.choices[0].delta.content or "" for chunk in
                               self.client.chat.completions.create(
                                   model="opus", stream=True,
                                   messages=[{"role": "user", "content": prompt}]))
        self.assertEqual(streamed("[[fake:words:12]][[fake:cut:5]]"), WORDS)
        with self.assertRaises(openai.APIError) as caught:
            streamed("[[fake:words:12]][[fake:cut:5]][[fake:differ]]")
        self.assertIn("answered differently", str(caught.exception))


    def test_responses_create_stream_and_follow_up(self):
        response = self.client.responses.create(model="sonnet", input="hi",
                                                instructions="Be brief.")
        self.assertEqual(response.output_text, "Hello from the fake API.")
        self.assertEqual((response.status, response.usage.output_tokens), ("completed", 9))
        follow_up = self.client.responses.create(model="sonnet", input="and?",
                                                 previous_response_id=response.id)
        self.assertEqual(follow_up.previous_response_id, response.id)
        kinds = []
        with self.client.responses.stream(model="sonnet", input="[[fake:thinking]]",
                                          reasoning={"effort": "high"}) as stream:
            for event in stream:
                kinds.append(event.type)
            final = stream.get_final_response()
        self.assertEqual(final.output_text, "Hello from the fake API.")
        self.assertEqual(kinds[0], "response.created")
        self.assertEqual(kinds[-1], "response.completed")
        self.assertIn("response.reasoning_summary_text.delta", kinds)
        with self.assertRaises(openai.NotFoundError):
            self.client.responses.create(model="sonnet", input="x",
                                         previous_response_id="resp_gone")
        with self.assertRaises(openai.BadRequestError):
            self.client.responses.create(model="sonnet", input="x", tools=[{
                "type": "function", "name": "no spaces", "parameters": {"type": "object"}}])


##############################################################################
# The OpenAI Agents SDK as the client
##############################################################################

try:
    import agents
except ImportError:
    agents = None


@unittest.skipUnless(agents is not None or REQUIRE_ALL, "the openai-agents package is not "
                     "installed")
class AgentsSDKTest(FakeClaudeMixin, unittest.TestCase):
    """An agent of the OpenAI Agents SDK on each of its two model kinds, against the proxy."""

    def test_an_agent_answers_streams_and_goes_on(self):
        if agents is None:
            self.fail("PROXY_REQUIRE_ALL=1 but the openai-agents package is not installed")
        import asyncio
        agents.set_tracing_disabled(True)  # its traces would go to OpenAI
        p = self.start_proxy()

        async def talk(model_kind):
            client = openai.AsyncOpenAI(base_url="http://127.0.0.1:%d/v1" % p.port,
                                        api_key="unused", max_retries=0)
            try:
                agent = agents.Agent(name="Assistant", instructions="Be brief.", model=model_kind(
                    model="claude-sonnet-4", openai_client=client))
                first = await agents.Runner.run(agent, "say hi")
                streamed = agents.Runner.run_streamed(agent, "[[fake:thinking]] again")
                kinds = {event.data.type async for event in streamed.stream_events()
                         if event.type == "raw_response_event"}
                follow = await agents.Runner.run(agent, first.to_input_list() + [
                    {"role": "user", "content": "and then?"}])
                return first.final_output, streamed.final_output, kinds, follow.final_output
            finally:
                await client.close()

        for kind in (agents.OpenAIResponsesModel, agents.OpenAIChatCompletionsModel):
            first, streamed, kinds, follow = asyncio.run(talk(kind))
            self.assertEqual((first, streamed, follow), ("Hello from the fake API.",) * 3, kind)
            self.assertIn("response.reasoning_summary_text.delta", kinds, kind)
            # The follow-up sent the first answer back, and it reached the CLI as a turn.
            self.assertIn({"type": "text", "text": "Hello from the fake API."},
                          sent(self.runs()[-1], "assistant"))
            self.assertEqual(self.runs()[-1]["system"], "Be brief.")

    def test_an_agent_loop_of_two_tool_steps(self):
        """The agent calls one tool, then (seeing its result) another, then answers: the
        Runner runs the tools itself, each step one request to the proxy."""
        if agents is None:
            self.fail("PROXY_REQUIRE_ALL=1 but the openai-agents package is not installed")
        import asyncio
        agents.set_tracing_disabled(True)
        p = self.start_proxy()
        ran = []

        @agents.function_tool
        def find_home(person: str) -> str:
            """Where a person lives."""
            ran.append(("find_home", person))
            return "Paris"

        @agents.function_tool
        def get_weather(city: str) -> str:
            """The weather in a city."""
            ran.append(("get_weather", city))
            return "sunny in " + city

        async def run(model_kind, stream):
            client = openai.AsyncOpenAI(base_url="http://127.0.0.1:%d/v1" % p.port,
                                        api_key="unused", max_retries=0)
            try:
                agent = agents.Agent(name="Helper", tools=[find_home, get_weather],
                                     model=model_kind(model="sonnet", openai_client=client))
                task = ('Weather where Ada lives? [[fake:call:find_home:{"person": "Ada"}]]'
                        '[[fake:then:get_weather:{"city": "Paris"}]]')
                if stream:
                    result = agents.Runner.run_streamed(agent, task)
                    async for _ in result.stream_events():
                        pass
                    return result.final_output
                return (await agents.Runner.run(agent, task)).final_output
            finally:
                await client.close()

        for kind in (agents.OpenAIResponsesModel, agents.OpenAIChatCompletionsModel):
            for stream in (False, True):
                del ran[:]
                runs_before = len(self.runs())
                self.assertEqual(asyncio.run(run(kind, stream)), "Tools said: sunny in Paris")
                self.assertEqual(ran, [("find_home", "Ada"), ("get_weather", "Paris")],
                                 (kind, stream))
                self.assertEqual(len(self.runs()) - runs_before, 3, "three model turns")
        self.assert_no_cli_left(p)


##############################################################################
# The official Anthropic Python SDK as the client
##############################################################################

try:
    import anthropic
except ImportError:
    anthropic = None


@unittest.skipUnless(anthropic is not None or REQUIRE_ALL, "the anthropic package is not installed")
class AnthropicSDKTest(FakeClaudeMixin, unittest.TestCase):
    """anthropic.Anthropic(base_url=...) against /v1/messages."""

    def setUp(self):
        super().setUp()
        if anthropic is None:
            self.fail("PROXY_REQUIRE_ALL=1 but the anthropic package is not installed")
        self.proxy = self.start_proxy(api_keys=["sdk-key"])
        self.client = anthropic.Anthropic(base_url="http://127.0.0.1:%d" % self.proxy.port,
                                          api_key="sdk-key", max_retries=0, timeout=30)
        self.addCleanup(self.client.close)

    def ask(self, content, **fields):
        return self.client.messages.create(model="claude-opus-5-5", max_tokens=100, messages=[
            {"role": "user", "content": content}], **fields)

    def test_create(self):
        message = self.ask("hi", system="Be brief.", stop_sequences=[" fake"])
        self.assertEqual([b.text for b in message.content], ["Hello from the"])
        self.assertEqual((message.stop_reason, message.stop_sequence), ("stop_sequence", " fake"))
        # The CLI was stopped at the stop sequence: the usage it had reported by then.
        self.assertEqual((message.usage.input_tokens, message.usage.output_tokens), (12, 1))
        self.assertEqual(self.runs()[-1]["system"], "Be brief.")
        self.assertEqual(self.ask("hi").usage.output_tokens, 9)

    def test_stream(self):
        with self.client.messages.stream(model="claude-opus-5-5", max_tokens=100, messages=[
                {"role": "user", "content": "[[fake:thinking]]"}]) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        self.assertEqual(text, "Hello from the fake API.")
        self.assertEqual([b.type for b in final.content], ["thinking", "text"])
        self.assertEqual(final.content[0].thinking, "Let me think briefly.")
        self.assertEqual(final.stop_reason, "end_turn")

    def test_tool_use_parses_whole_and_streamed(self):
        tools = [{"name": "get_weather", "description": "The weather in a city.",
                  "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
        prompt = 'Paris? [[fake:reply:Checking.]][[fake:call:get_weather:{"city": "Paris"}]]'
        whole = self.ask(prompt, tools=tools)
        self.assertEqual(whole.stop_reason, "tool_use")
        self.assertEqual([(b.type, getattr(b, "text", None) or getattr(b, "input", None))
                          for b in whole.content],
                         [("text", "Checking."), ("tool_use", {"city": "Paris"})])
        with self.client.messages.stream(model="claude-opus-5-5", max_tokens=100, tools=tools,
                                         messages=[{"role": "user", "content": prompt}]) as s:
            final = s.get_final_message()
        self.assertEqual((final.stop_reason, final.content[1].name, final.content[1].input),
                         ("tool_use", "get_weather", {"city": "Paris"}))
        follow = self.client.messages.create(
            model="claude-opus-5-5", max_tokens=100, tools=tools, messages=[
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": whole.content},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id":
                                              whole.content[1].id, "content": "cloudy"}]}])
        self.assertEqual(follow.content[0].text, "Tools said: cloudy")

    def test_errors_raise_the_sdk_exceptions(self):
        for prompt, error, status in [("[[fake:ratelimit:60]]", anthropic.RateLimitError, 429),
                                      ("[[fake:err401]]", anthropic.AuthenticationError, 401),
                                      ("[[fake:err529]]", anthropic.APIStatusError, 529),
                                      ("[[fake:toolong]]", anthropic.BadRequestError, 400)]:
            with self.assertRaises(error) as caught:
                self.ask(prompt)
            self.assertEqual(caught.exception.status_code, status, prompt)
        wrong = anthropic.Anthropic(base_url="http://127.0.0.1:%d" % self.proxy.port,
                                    api_key="wrong", max_retries=0)
        self.addCleanup(wrong.close)
        with self.assertRaises(anthropic.AuthenticationError):
            wrong.messages.create(model="opus", max_tokens=5, messages=[
                {"role": "user", "content": "hi"}])
        with self.assertRaises(anthropic.APIError):
            with self.client.messages.stream(model="opus", max_tokens=5, messages=[
                    {"role": "user", "content": "[[fake:diemid]]"}]) as stream:
                "".join(stream.text_stream)

    def test_count_tokens_and_models(self):
        self.assertGreater(self.client.messages.count_tokens(model="opus", messages=[
            {"role": "user", "content": "hello " * 100}]).input_tokens, 100)
        self.assertIn("claude-opus-4", [m.id for m in self.client.models.list()])


##############################################################################
# Soak run (opt-in: PROXY_SOAK=1)
##############################################################################

def daemon_figures(pid):
    """(RSS kB, peak RSS kB, threads, open fds) of a process, from /proc; None where absent."""
    try:
        with open("/proc/%d/status" % pid) as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        return (int(status["VmRSS"].split()[0]), int(status["VmHWM"].split()[0]),
                int(status["Threads"]), len(os.listdir("/proc/%d/fd" % pid)))
    except (OSError, KeyError, ValueError):
        out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True)
        rss = int(out.stdout.strip() or 0)
        return rss, rss, None, None


@unittest.skipUnless(os.environ.get("PROXY_SOAK") == "1", "set PROXY_SOAK=1 for the soak run")
class SoakTest(FakeClaudeMixin, unittest.TestCase):
    """Thousands of requests through the real daemon and the fake CLI: a mix of answers,
    streams, clients that leave, CLI failures and bad requests. Reports what was served, peak
    memory, and descriptors and threads at start and end; fails on any wrong answer or leak."""

    REQUESTS = int(os.environ.get("PROXY_SOAK_REQUESTS", "3000"))
    CLIENTS = 8
    KEY = {"Authorization": "Bearer soak"}

    def one(self, port, kind):
        """Send one request of `kind`; returns its outcome: a status, "left", or "wrong: ..."."""
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            def post(body, headers=self.KEY, raw=None):
                conn.request("POST", "/v1/chat/completions", body=raw or json.dumps(body),
                             headers=dict(headers, **{"Content-Type": "application/json"}))
                return conn.getresponse()

            if kind in ("health", "models"):
                conn.request("GET", "/health" if kind == "health" else "/v1/models",
                             headers=self.KEY)
                response = conn.getresponse()
                response.read()
                return response.status
            if kind.startswith(("messages", "responses")):  # the other two dialects
                client = MessagesClient() if kind.startswith("messages") else ResponsesClient()
                stream = kind.endswith("stream")
                conn.request("POST", client.path, body=json.dumps(client.body("hi", stream)),
                             headers=dict(self.KEY, **{"Content-Type": "application/json"}))
                response = conn.getresponse()
                data = response.read()
                if response.status != 200:
                    return response.status
                got = client.streamed(client.parse_stream(data))[:3] if stream else \
                    client.answer(json.loads(data))
                expected = ("Hello from the fake API.", "", "stop")
                return 200 if tuple(got) == expected else "wrong: %.80r" % (got,)
            if kind.startswith("tool call"):  # parallel calls, ended with the model's turn
                body = ChatClient().with_tools(chat_body(DialectContract.PARIS +
                                                         DialectContract.OSLO),
                                               DialectContract.WEATHER)
                stream = kind.endswith("stream")
                response = post(dict(body, stream=stream))
                data = response.read()
                if response.status != 200:
                    return response.status
                calls, finish = ChatClient().streamed_calls(parse_sse(data)) if stream else \
                    ChatClient().calls(json.loads(data))
                got = [(n, a) for _, n, a in calls], finish
                expected = ([("get_weather", {"city": "Paris"}), ("get_time", {"city": "Oslo"})],
                            "tool")
                return 200 if got == expected else "wrong: %.80r" % (got,)
            if kind == "conversation":  # resumed from a session: its earlier turns are its own
                name = "soak-%s" % uuid_hex()
                response = post(chat_body(messages=[
                    {"role": "user", "content": "I am %s." % name},
                    {"role": "assistant", "content": "Hello %s." % name},
                    {"role": "user", "content": "Who am I? [[fake:reply:%s]]" % name}]))
                data = response.read()
                if response.status != 200:
                    return response.status
                got = json.loads(data)["choices"][0]["message"]["content"]
                return 200 if got == name else "wrong: %.80r" % (got,)
            if kind == "leave at once":
                sock = send_chat(port, chat_body("[[fake:silent]]"))
                sock.close()
                return "left"
            if kind == "leave mid-stream":
                response = post(chat_body("[[fake:drip:0.005]]", stream=True))
                if response.status != 200 or response.read(6) != b"data: ":
                    return "wrong: %d" % response.status
                conn.sock.close()
                return "left"
            content = {"chat": "hi", "stream": "hi", "overloaded": "[[fake:err529]]",
                       "exits early": "[[fake:exit:7]]", "dies mid-stream": "[[fake:diemid]]",
                       "bad request": "", "no key": "hi"}[kind]
            stream = kind in ("stream", "dies mid-stream")
            response = post(chat_body(content, stream=stream,
                                      stream_options={"include_usage": True} if stream else None),
                            headers={} if kind == "no key" else self.KEY,
                            raw=b"{not json" if kind == "bad request" else None)
            data = response.read()
            if stream and response.status == 200:
                last = parse_sse(data)[-1]
                if (last == "[DONE]") != (kind == "stream"):
                    return "wrong: stream ended with %.80r" % (last,)
            return response.status
        finally:
            conn.close()

    EXPECTED = {"chat": 200, "stream": 200, "health": 200, "models": 200, "leave at once": "left",
                "leave mid-stream": "left", "overloaded": 503, "exits early": 502,
                "dies mid-stream": 200, "bad request": 400, "no key": 401, "messages": 200,
                "messages stream": 200, "responses": 200, "responses stream": 200,
                "tool call": 200, "tool call stream": 200, "conversation": 200}
    WEIGHTS = {"conversation": 8, "chat": 20, "stream": 15, "health": 4, "models": 4, "leave at once": 5,
               "leave mid-stream": 8, "overloaded": 4, "exits early": 4, "dies mid-stream": 4,
               "bad request": 4, "no key": 3, "messages": 7, "messages stream": 6,
               "responses": 6, "responses stream": 6, "tool call": 5, "tool call stream": 5}

    def test_soak(self):
        import concurrent.futures
        import random
        daemon, port = start_daemon(self, "--api-key", "soak", "--max-concurrency", "4",
                                    "--warm", "2")

        def health():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/health")
            try:
                return json.loads(conn.getresponse().read())["warm"]
            finally:
                conn.close()

        def warm():
            """The CLIs waiting for a request, and the daemon's descriptors without theirs
            (three pipes each)."""
            ready = health()["ready"]
            figures = daemon_figures(daemon.pid)
            return ready, None if figures[3] is None else figures[3] - 3 * ready

        start = daemon_figures(daemon.pid)
        start_fds = warm()[1]
        peak = [start]
        done = threading.Event()

        def sample():
            while not done.wait(0.2):
                peak.append(daemon_figures(daemon.pid))

        sampler = threading.Thread(target=sample)
        sampler.start()
        rng = random.Random(3)
        kinds = rng.choices(list(self.WEIGHTS), weights=list(self.WEIGHTS.values()),
                            k=self.REQUESTS)
        begun = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(self.CLIENTS) as pool:
            outcomes = list(pool.map(lambda kind: (kind, self.one(port, kind)), kinds))
        seconds = time.monotonic() - begun
        wait_until(lambda: len(children_of(daemon.pid)) == warm()[0], timeout=30,
                   what="every CLI to end but those waiting for a request")
        if start[3] is not None:
            wait_until(lambda: warm()[1] <= start_fds, timeout=30,
                       what="the daemon's descriptors to return to %d" % start_fds)
            wait_until(lambda: daemon_figures(daemon.pid)[2] <= start[2], timeout=30,
                       what="the daemon's threads to return to %d" % start[2])
        end = daemon_figures(daemon.pid)
        done.set()
        sampler.join()
        wrong = [(kind, got) for kind, got in outcomes if got != self.EXPECTED[kind]]
        statuses = collections.Counter(got for _, got in outcomes)
        runs = len(self.runs())
        print("\nsoak: %d requests by %d clients in %.1f s (%.0f/s), %d CLI runs, "
              "--max-concurrency 4, --warm 2 (%s)" % (
                  len(outcomes), self.CLIENTS, seconds, len(outcomes) / seconds, runs, ", ".join(
                      "%s %s" % item for item in sorted(health().items()))))
        print("soak: answers %s" % ", ".join("%s: %d" % (k, v) for k, v in sorted(
            statuses.items(), key=str)))
        print("soak: wrong answers %d, served %d, refused or failed on purpose %d, clients "
              "that left %d" % (len(wrong), sum(1 for _, g in outcomes if g == 200),
                                sum(1 for _, g in outcomes if isinstance(g, int) and g != 200),
                                statuses["left"]))
        print("soak: daemon RSS %d kB at start, %d kB peak, %d kB at end; fds %s -> %s; "
              "threads %s -> %s" % (start[0], max(p[1] for p in peak + [end]), end[0],
                                    start[3], end[3], start[2], end[2]))
        print("soak: daemon RSS after each fifth of the run: %s kB (growth that goes on is a "
              "leak; a level that settles is the allocator's)" % ", ".join(
                  str(peak[min(len(peak) - 1, len(peak) * n // 5)][0]) for n in range(1, 6)))
        self.assertEqual(wrong, [])
        daemon.send_signal(signal.SIGTERM)
        self.assertEqual(daemon.wait(30), 0)
        self.assertNotIn("Traceback", daemon.log())
        self.assertEqual(session_files(), [], "no session file left")


##############################################################################
# Benchmark (opt-in: PROXY_BENCH=1)
##############################################################################

@unittest.skipUnless(os.environ.get("PROXY_BENCH") == "1", "set PROXY_BENCH=1 to benchmark")
class Benchmark(FakeClaudeMixin, unittest.TestCase):
    """Prints figures of the proxy against running the same CLI directly, measured in pairs in
    the same run (medians, and medians of the per-pair ratios): what the proxy costs (HTTP,
    translation, process handling) and what warm processes save. The real CLI against
    FakeAnthropicAPI when it is installed, else the fake CLI with a start-up delay like the
    real one's (FAKE_CLAUDE_START_DELAY), or with PROXY_BENCH_FAKE=1."""

    ROUNDS = int(os.environ.get("PROXY_BENCH_ROUNDS", "15"))
    THINK = 2.0  # seconds a user takes to read an answer and write the next message
    START_DELAY = "0.5"  # the fake's, in seconds: the real CLI's spawn-to-first-token here

    WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    DELTA = {"chat": b'"content": "', "messages": b'"text_delta"',
             "responses": b'"response.output_text.delta"'}

    def setUp(self):
        super().setUp()
        self.claude = None if os.environ.get("PROXY_BENCH_FAKE") == "1" else find_real_claude()
        self.real = bool(self.claude)
        if self.real:
            self.api = FakeAnthropicAPI()
            threading.Thread(target=self.api.serve_forever, daemon=True).start()
            self.addCleanup(self.api.server_close)
            self.addCleanup(self.api.shutdown)
            home = tempfile.mkdtemp(prefix="proxy-bench-home-")
            self.addCleanup(shutil.rmtree, home, True)
            # A subscription login, as the proxy's users have: each answer then carries the
            # rate_limit_event the daemon learns from (the API's unified headers).
            extra = {"HOME": home, "ANTHROPIC_BASE_URL": self.api.url(),
                     "CLAUDE_CODE_OAUTH_TOKEN": "sk-ant-oat01-dummy", "DISABLE_TELEMETRY": "1",
                     "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1",
                     "CLAUDE_CODE_MAX_RETRIES": "0"}
            now = int(time.time())
            self.api.unified.update({
                "anthropic-ratelimit-unified-status": "allowed",
                "anthropic-ratelimit-unified-5h-utilization": "0.2",
                "anthropic-ratelimit-unified-5h-reset": str(now + 18000),
                "anthropic-ratelimit-unified-7d-utilization": "0.1",
                "anthropic-ratelimit-unified-7d-reset": str(now + 604800)})
        else:
            self.claude = self.fake_path
            extra = {"FAKE_CLAUDE_START_DELAY": self.START_DELAY}
        patch = mock.patch.dict(os.environ, extra)
        patch.start()
        self.addCleanup(patch.stop)
        os.environ.pop("ANTHROPIC_API_KEY", None)
        self.cwd = tempfile.mkdtemp(prefix="proxy-bench-cwd-")
        self.files = tempfile.mkdtemp(prefix="proxy-bench-files-")
        for path in (self.cwd, self.files):
            self.addCleanup(shutil.rmtree, path, True)
        self.what = "real claude 2.1.331 + fake Messages API" if self.real else \
            "fake claude, %s s start-up" % self.START_DELAY
        self.words = "[[api:words:%d]]" if self.real else "[[fake:words:%d]]"

    def direct(self, launch):
        """Run the CLI as the proxy does, without the proxy: (first token s, answered s, the
        times of its text deltas); `answered`: its result line, or with tools the end of the
        model's turn that called."""
        cwd = self.cwd  # one directory for every run, as the proxy has (and not a git repo)
        paths = {}
        for name, text in launch.files().items():
            paths[name] = os.path.join(self.files, name)
            with open(paths[name], "w") as f:
                f.write(text)
        begun = time.perf_counter()
        proc = subprocess.Popen(launch.argv(paths), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=launch.environment(
                                    dict(os.environ)), cwd=cwd)
        proc.stdin.write(launch.stdin())
        proc.stdin.close()
        deltas, answered = [], None
        for line in proc.stdout:
            if b"text_delta" in line or b"input_json_delta" in line:
                deltas.append(time.perf_counter() - begun)
            if answered is None and (b'"type":"result"' in line or launch.request.tools and
                                     b'"stop_reason":"tool_use"' in line):
                answered = time.perf_counter() - begun  # all a caller needs; exit comes later
        proc.wait()
        proc.stdout.close()
        return (deltas[0] if deltas else None), answered, deltas

    def via_proxy(self, port, dialect, body):
        """(first token s, whole answer s, the times of its text deltas) through the proxy.
        Read from the socket line by line, buffered in C, as direct() reads the CLI's pipe:
        http.client's chunked reading in Python would count the client's cost as the proxy's."""
        data = json.dumps(body).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=300) as sock, \
                sock.makefile("rb") as answer:
            begun = time.perf_counter()
            sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                         b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (
                             DIALECT_PATHS[dialect].encode(), len(data), data))
            status = answer.readline()
            headers = {}
            for line in iter(answer.readline, b"\r\n"):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            deltas = []
            if headers.get("transfer-encoding") == "chunked":
                marker = self.DELTA[dialect]
                for line in answer:
                    if line == b"0\r\n":  # the last chunk
                        break
                    if marker in line and b'"content": ""' not in line:
                        deltas.append(time.perf_counter() - begun)
            else:
                answer.read(int(headers["content-length"]))
            total = time.perf_counter() - begun
        self.assertTrue(status.startswith(b"HTTP/1.1 200 "), status)
        return (deltas[0] if deltas else None), total, deltas

    def proxies(self, **overrides):
        """A proxy without warm processes and one with them."""
        return (self.start_proxy(claude_bin=self.claude, timeout=300.0, warm=0, **overrides),
                self.start_proxy(claude_bin=self.claude, timeout=300.0, warm=2, **overrides))

    def paired(self, title, dialect, body, first):
        """ROUNDS rounds of: the CLI directly, the proxy without warm processes, the proxy
        with them; then THINK seconds, as a user reading the answer, in which the warm proxy's
        next CLI starts (so that it does not slow the next round's other two down)."""
        cold, warm = self.proxies()
        launch = proxy.Launch(self.claude, proxy.DIALECTS[
            [d.path for d in proxy.DIALECTS].index(DIALECT_PATHS[dialect][3:])]().parse(body))
        index = 0 if first else 1
        for p in (cold, warm):  # learn the preamble; give the warm proxy its shape
            self.via_proxy(p.port, dialect, body)
        rows = {"direct": [], "proxy": [], "proxy, warm": []}
        for _ in range(self.ROUNDS):
            rows["direct"].append(self.direct(launch)[index])
            rows["proxy"].append(self.via_proxy(cold.port, dialect, body)[index])
            wait_until(warm.server.warm.settled, timeout=60, what="the warm CLI")
            rows["proxy, warm"].append(self.via_proxy(warm.port, dialect, body)[index])
            time.sleep(self.THINK)
        hits = warm.server.warm.hits
        for p in (cold, warm):  # their idle CLIs would load the next figures
            p.close()
        base = statistics.median(rows["direct"])
        print("\n%s (%s), %d rounds:" % (title, self.what, self.ROUNDS))
        for name, values in rows.items():
            ratios = [v / d for v, d in zip(values, rows["direct"])]
            added = [v - d for v, d in zip(values, rows["direct"])]
            print("  %-12s median %7.1f ms   per pair: x%.3f, %+7.1f ms (medians)" % (
                name, statistics.median(values) * 1000, statistics.median(ratios),
                statistics.median(added) * 1000))
        print("  (direct median %.1f ms; the warm proxy took a waiting CLI %d times of %d)" % (
            base * 1000, hits, self.ROUNDS))
        return {name: statistics.median([v / d for v, d in zip(values, rows["direct"])])
                for name, values in rows.items()}, {
            name: statistics.median([v - d for v, d in zip(values, rows["direct"])])
            for name, values in rows.items()}

    def relay(self, deltas=2000, rounds=5):
        """A long answer streamed: the time from its first delta to its last, the CLI directly
        and through the proxy, and the largest gap between two deltas."""
        p = self.start_proxy(claude_bin=self.claude, timeout=300.0, warm=0)
        body = {"model": "sonnet", "stream": True, "messages": [
            {"role": "user", "content": "bench " + self.words % deltas}]}
        launch = proxy.Launch(self.claude, proxy.parse_chat_request(body))
        per_delta, spans, gaps = [], {"direct": [], "proxy": []}, {"direct": [], "proxy": []}
        for _ in range(rounds):
            for name, times in (("direct", self.direct(launch)[2]),
                                ("proxy", self.via_proxy(p.port, "chat", body)[2])):
                self.assertGreaterEqual(len(times), deltas * 0.9, name)
                spans[name].append(times[-1] - times[0])
                gaps[name].append(max(b - a for a, b in zip(times, times[1:])))
            per_delta.append((spans["proxy"][-1] - spans["direct"][-1]) / deltas)
        print("\nrelay of a %d-delta answer (%s), %d rounds, medians:" % (
            deltas, self.what, rounds))
        for name in ("direct", "proxy"):
            print("  %-7s first to last delta %7.1f ms, largest gap %6.2f ms" % (
                name, statistics.median(spans[name]) * 1000,
                statistics.median(gaps[name]) * 1000))
        print("  the proxy adds %.4f ms per delta; %+.2f ms to the largest gap" % (
            statistics.median(per_delta) * 1000,
            (statistics.median(gaps["proxy"]) - statistics.median(gaps["direct"])) * 1000))
        return statistics.median(per_delta)

    def concurrent(self, streams=16):
        """`streams` streamed requests at once through the daemon as a process of its own
        (--max-concurrency `streams`): all answer; time to first token; the daemon's peak
        RSS, its CLIs not counted."""
        daemon, port = start_daemon(self, "--max-concurrency", str(streams), "--warm", "2",
                                    claude_bin=self.claude, env=dict(os.environ))
        body = {"model": "sonnet", "stream": True, "messages": [
            {"role": "user", "content": "bench " + self.words % 50}]}
        self.via_proxy(port, "chat", body)  # the preamble
        start = daemon_figures(daemon.pid)
        results, sampled, done = [], [start[0]], threading.Event()

        def sample():  # VmRSS while they run (VmHWM would also count the start, before trim)
            while not done.wait(0.02):
                sampled.append(daemon_figures(daemon.pid)[0])

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            self.assertEqual(in_parallel(lambda _: results.append(self.via_proxy(
                port, "chat", body)), range(streams), timeout=600), [])
        finally:
            done.set()
            sampler.join()
        firsts = sorted(first for first, _, _ in results)
        self.assertEqual(len(results), streams)
        print("\n%d concurrent streams (%s): all %d answered; first token p50 %.0f ms, "
              "p95 %.0f ms; the daemon's RSS %.1f MB before, at most %.1f MB while they ran "
              "(sampled every 20 ms; its CLIs not counted)" % (
                  streams, self.what, len(results), statistics.median(firsts) * 1000,
                  firsts[int(0.95 * (len(firsts) - 1) + 0.5)] * 1000, start[0] / 1024,
                  max(sampled) / 1024))
        return max(sampled) / 1024

    def conversation(self, turns=10):
        """A conversation of `turns` streamed requests, warm processes off and on, the user
        taking THINK seconds between them: time to first token and the share of the previous
        prompt read from the (simulated) cache."""
        for warm in (0, 2):
            p = self.start_proxy(claude_bin=self.claude, timeout=300.0, warm=warm)
            messages = []
            rows = []
            for n in range(1, turns + 1):
                messages.append({"role": "user", "content": "bench %s turn %d %s" % (
                    "warm" if warm else "cold", n, self.words % 50)})
                if n > 1:
                    time.sleep(self.THINK)
                if warm:
                    wait_until(p.server.warm.settled, timeout=60, what="the warm CLI")
                conn = p.connect(timeout=300)
                begun = time.perf_counter()
                conn.request("POST", "/v1/chat/completions", body=json.dumps({
                    "model": "sonnet", "stream": True, "messages": messages,
                    "stream_options": {"include_usage": True}}),
                    headers={"Content-Type": "application/json"})
                events = []
                first = None
                response = conn.getresponse()
                while True:
                    line = response.readline()
                    if not line:
                        break
                    if first is None and self.DELTA["chat"] in line:
                        first = time.perf_counter() - begun
                    if line.startswith(b"data: {"):
                        events.append(json.loads(line[6:]))
                conn.close()
                text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                               if e["choices"])
                usage = events[-1]["usage"]
                rows.append((first, usage["prompt_tokens"],
                             usage["prompt_tokens_details"]["cached_tokens"]))
                messages.append({"role": "assistant", "content": text})
            print("\na %d-turn conversation, streamed, warm processes %s, %g s between turns "
                  "(%s):" % (turns, "on" if warm else "off", self.THINK, self.what))
            print("  turn  first token  prompt  cache read of the previous prompt")
            for n, (first, prompt, read) in enumerate(rows, 1):
                print("  %4d  %8.1f ms  %6d  %s" % (n, first * 1000, prompt, "%5.1f%%" % (
                    100.0 * read / rows[n - 2][1]) if n > 1 else "     -"))
            print("  turns 2-%d: first token median %.1f ms; the proxy took a waiting CLI %d "
                  "times" % (turns, statistics.median(r[0] for r in rows[1:]) * 1000,
                             p.server.warm.hits))
            p.close()

    def report_tools(self):
        """What offering tools costs (the bridge starts with the CLI), and a tool call through
        the proxy against the same call made by the CLI directly."""
        cold, _ = self.proxies()
        call = 'bench [[api:call:get_weather:{"city": "Paris"}]]' if self.real else \
            'bench [[fake:call:get_weather:{"city": "Paris"}]]'
        body = {"model": "sonnet", "messages": [{"role": "user", "content": call}],
                "tools": self.WEATHER}
        rows = {"direct, no tools": [], "direct, bridge + call": [], "proxy, call": []}
        for _ in range(self.ROUNDS):
            rows["direct, no tools"].append(self.direct(launch_for(
                "hi", self.claude, model="sonnet"))[1])
            rows["direct, bridge + call"].append(self.direct(launch_for(
                call, self.claude, model="sonnet", tools=self.WEATHER))[1])
            rows["proxy, call"].append(self.via_proxy(cold.port, "chat", body)[1])
        base = statistics.median(rows["direct, bridge + call"])
        print("\nfunction calling (%s), %d rounds, medians:" % (self.what, self.ROUNDS))
        for name, values in rows.items():
            print("  %-22s %7.1f ms (x%.3f of the direct call)" % (
                name, statistics.median(values) * 1000, statistics.median(values) / base))

    def report_conversations(self):
        """A ten-request conversation with a tool call, each dialect, as real turns, and
        Chat's as one transcript each time, for comparison: the share of each request's prompt
        read from the (simulated) prompt cache."""
        for history in ("turns", "transcript"):
            p = self.start_proxy(claude_bin=self.claude, history=history)
            self.assertEqual(p.chat("bench warm-up", model="sonnet")[0], 200)  # the preamble
            for dialect in ("chat", "messages", "responses") if history == "turns" else ("chat",):
                figures = converse(p, dialect, 10, "bench-%s-%s" % (history, dialect),
                                   words=200)
                print("\n" + cache_table("conversation as %s, %s (%s):" % (
                    history, dialect, self.what), figures))
                read = sum(r for _, r, _ in figures[1:])
                print("  requests 2-10: %.1f%% of their prompt tokens read from the cache" % (
                    100.0 * read / sum(t for t, _, _ in figures[1:])))

    def warm_costs(self, rounds=10, deltas=2000, streams=16):
        """What warm processes cost the answers being streamed, paired with the CLI spawned
        directly in the same run: a long stream's first-to-last delta span and its largest
        gap, through a proxy whose waiting CLI the stream takes (so that its replacement is
        due meanwhile); time to first token and a whole answer's time in alternating pairs,
        the second of each pair sent the moment the first has its answer; 16 streams at once,
        wall time and first token p50. The daemon runs as its own process, as it is used.
        Returns the figures the targets read."""
        figures = {}
        daemon, port = start_daemon(self, "--warm", "2", "--timeout", "300",
                                    claude_bin=self.claude, env=dict(os.environ))

        def settled(ready=2):  # the shape in use has its two CLIs waiting (WARM_STEADY)
            wait_until(lambda: json.loads(http_get(port, "/health"))["warm"]["ready"] >=
                       ready, timeout=60, what="the warm CLIs")

        long = {"model": "sonnet", "stream": True, "messages": [
            {"role": "user", "content": "bench " + self.words % deltas}]}
        launch = proxy.Launch(self.claude, proxy.parse_chat_request(long))
        for _ in range(3):  # the preamble, then the shape's first two
            self.via_proxy(port, "chat", long)
        spans, gaps, direct_spans, relayed_spans = [], [], [], []
        # Direct first in each pair: the other way round the pool would start the CLI the
        # stream took while the direct one streams. Ten pairs: with five, on two cores, the
        # median moved from x1.02 to x1.30 between two runs of the same code.
        for _ in range(rounds):
            settled()
            direct = self.direct(launch)[2]
            relayed = self.via_proxy(port, "chat", long)[2]
            direct_spans.append(direct[-1] - direct[0])
            relayed_spans.append(relayed[-1] - relayed[0])
            spans.append(relayed_spans[-1] / direct_spans[-1])
            gaps.append(max(b - a for a, b in zip(relayed, relayed[1:])) -
                        max(b - a for a, b in zip(direct, direct[1:])))
            time.sleep(self.THINK)
        figures["relay"], figures["gap"] = statistics.median(spans), statistics.median(gaps)
        print("\nwarm processes and the answers (%s):" % self.what)
        print("  %d-delta stream, first to last delta: x%.3f of direct (median of %d pairs, "
              "x%.3f to x%.3f; median spans %.0f ms against %.0f ms, x%.3f); largest gap %+.2f "
              "ms against direct" % (
                  deltas, figures["relay"], len(spans), min(spans), max(spans),
                  statistics.median(relayed_spans) * 1000, statistics.median(direct_spans) * 1000,
                  statistics.median(relayed_spans) / statistics.median(direct_spans),
                  figures["gap"] * 1000))
        for stream in (True, False):
            body = dict(dialect_body("chat", "bench hi"), stream=stream)
            launch = proxy.Launch(self.claude, proxy.parse_chat_request(body))
            index = 0 if stream else 1
            for _ in range(2):
                self.via_proxy(port, "chat", body)
            ratios, after = [], []
            for _ in range(rounds):
                settled()
                direct = self.direct(launch)[index]
                first = self.via_proxy(port, "chat", body)[index]
                second = self.via_proxy(port, "chat", body)[index]  # at once
                ratios += [first / direct, second / direct]
                after.append(second / direct)
                time.sleep(self.THINK)
            name = "first token, streamed" if stream else "a whole answer, not streamed"
            figures[name] = statistics.median(ratios)
            print("  %s, alternating pairs: x%.3f of direct (median of %d); the second of a "
                  "pair, sent at once: x%.3f" % (name, figures[name], len(ratios),
                                                 statistics.median(after)))
        daemon.kill()
        daemon.wait()
        body = {"model": "sonnet", "stream": True, "messages": [
            {"role": "user", "content": "bench " + self.words % 50}]}
        launch = proxy.Launch(self.claude, proxy.parse_chat_request(body))
        daemon, port = start_daemon(self, "--max-concurrency", str(streams), "--warm", "2",
                                    claude_bin=self.claude, env=dict(os.environ))
        self.via_proxy(port, "chat", body)  # the preamble
        self.via_proxy(port, "chat", body)  # the shape: warm CLIs start for it
        walls, firsts = {"direct": [], "proxy": []}, {"direct": [], "proxy": []}
        for _ in range(3):
            for name, run in (("direct", lambda _: self.direct(launch)),
                              ("proxy", lambda _: self.via_proxy(port, "chat", body))):
                time.sleep(self.THINK)
                results, begun = [], time.perf_counter()
                self.assertEqual(in_parallel(lambda n: results.append(run(n)), range(streams),
                                             timeout=600), [])
                walls[name].append(time.perf_counter() - begun)
                firsts[name].append(statistics.median(r[0] for r in results))
        figures["wall"] = statistics.median(walls["proxy"]) / statistics.median(walls["direct"])
        figures["ttft16"] = statistics.median(firsts["proxy"]) / statistics.median(
            firsts["direct"])
        print("  %d streams at once: wall time x%.3f of direct (%.1f s against %.1f s), first "
              "token p50 x%.3f (%.0f ms against %.0f ms)" % (
                  streams, figures["wall"], statistics.median(walls["proxy"]),
                  statistics.median(walls["direct"]), figures["ttft16"],
                  statistics.median(firsts["proxy"]) * 1000,
                  statistics.median(firsts["direct"]) * 1000))
        daemon.kill()
        daemon.wait()
        return figures

    def test_warm_costs(self):
        figures = self.warm_costs()
        print("\ntargets (%s): relay x%.3f (<= 1.10), gap %+.2f ms (<= 5), first token x%.3f "
              "(<= 0.35), whole x%.3f (<= 0.40), 16 streams wall x%.3f and first token x%.3f "
              "(no worse than before)" % (
                  self.what, figures["relay"], figures["gap"] * 1000,
                  figures["first token, streamed"], figures["a whole answer, not streamed"],
                  figures["wall"], figures["ttft16"]))

    def test_benchmark(self):
        first = {}
        for dialect in ("chat", "messages", "responses"):
            first[dialect] = self.paired("time to first token, %s, streamed" % dialect, dialect,
                                         dict(dialect_body(dialect, "bench hi"), stream=True),
                                         first=True)
        whole = self.paired("a short answer, chat, not streamed", "chat",
                            dialect_body("chat", "bench hi"), first=False)
        per_delta = self.relay()
        rss = self.concurrent()
        self.conversation()
        self.report_tools()
        if self.real:
            self.report_conversations()
        print("\ntargets (%s):" % self.what)
        for dialect, (ratios, added) in first.items():
            print("  %-9s warm first token x%.3f of direct (target <= 0.5); without warm "
                  "%+.1f ms (target <= +10 ms)" % (dialect, ratios["proxy, warm"],
                                                   added["proxy"] * 1000))
        print("  short answer, not streamed: warm x%.3f, without %+.1f ms" % (
            whole[0]["proxy, warm"], whole[1]["proxy"] * 1000))
        print("  relay %.4f ms per delta (target <= 1); daemon peak RSS with 16 streams "
              "%.1f MB (target < 40)" % (per_delta * 1000, rss))


##############################################################################
# The fake against the recordings (when shared/claude-cli/ is beside the repo)
##############################################################################

RECORDINGS = os.environ.get("CLAUDE_CLI_RECORDINGS") or os.path.join(
    os.path.dirname(HERE), "shared", "claude-cli")


def recovery(lines):
    """Where each broken message gave up (abandoned_blocks.from_block_index), in order."""
    return [line["abandoned_blocks"]["from_block_index"] for line in lines
            if isinstance(line.get("abandoned_blocks"), dict)]


def calls_made(lines):
    """The API calls that CLI output shows: True for a streamed one (message_start), False for
    a message fetched whole (an assistant line of a message that was never started)."""
    calls, started = [], set()
    for line in lines:
        inner = line["event"] if line.get("type") == "stream_event" else {}
        if inner.get("type") == "message_start":
            calls.append(True)
            started.add(inner["message"]["id"])
        elif line.get("type") == "assistant" and not line.get("is_api_error_message") and \
                line["message"]["id"] not in started:
            calls.append(False)
            started.add(line["message"]["id"])
    return calls


def collapsed_shapes(lines):
    """line_shape of each line, a run of lines of one kind (deltas) once."""
    collapsed = []
    for line in lines:
        shape = line_shape(line)
        if not collapsed or collapsed[-1][0] != shape[0]:
            collapsed.append(shape)
    return collapsed


def bridges_running(workdir):
    """The pids of bridge processes (mcp-bridge with a tools file in `workdir`) still alive."""
    pids = []
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        try:
            with open("/proc/%s/cmdline" % name, "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"mcp-bridge" in argv and any(a.startswith(workdir.encode()) for a in argv) and \
                alive(int(name)):
            pids.append(int(name))
    return pids


def tool_results_after_the_stream(lines):
    """`lines` with each `user` line (a denied call's tool_result) that the CLI printed before
    its message's closing stream events (message_delta, message_stop) put after them. The real
    CLI denies the call as soon as its block is whole, while the stream ends: 2.1.331 prints
    the two in either order (once in a full .ci/run; 30 of 30 alone in the usual order), and
    nothing reads that order (the fold skips `user` lines and ends at message_delta)."""
    lines = list(lines)
    for i in range(len(lines) - 1, -1, -1):
        j = i
        while lines[j].get("type") == "user" and j + 1 < len(lines) and \
                lines[j + 1].get("type") == "stream_event" and \
                (lines[j + 1].get("event") or {}).get("type") in ("message_delta", "message_stop"):
            lines[j], lines[j + 1] = lines[j + 1], lines[j]
            j += 1
    return lines


def assert_same_lines(test, ours, real, where, ignore=frozenset()):
    """The fake's lines and the real CLI's: the same kinds in the same order, the same keys
    (but for top-level keys in `ignore`)."""
    ours, real = collapsed_shapes(ours), collapsed_shapes(real)
    test.assertEqual([k for k, _ in ours], [k for k, _ in real],
                     "%s: the kinds of lines differ" % where)
    for (kind, real_keys), (_, our_keys) in zip(real, ours):
        test.assertEqual((our_keys[0] - ignore, our_keys[1]), (real_keys[0] - ignore, real_keys[1]),
                         "%s %s: keys differ" % (where, kind))


def line_shape(line):
    """What identifies a stream-json line's kind, and the keys it and its payload carry."""
    kind = line.get("type")
    inner = line.get("event") or line.get("message") or {}
    sub = line.get("subtype") or (inner.get("type") if kind == "stream_event" else None)
    if kind == "assistant":
        sub = "api_error_%s" % ("status" if "api_error_status" in line else "nostatus") \
            if line.get("is_api_error_message") else inner["content"][0]["type"]
    if kind == "stream_event" and sub == "content_block_start":
        sub += "/" + inner["content_block"]["type"]
    if kind == "stream_event" and sub == "content_block_delta":
        sub += "/" + inner["delta"]["type"]
    if kind == "result":
        sub = "%s/%s" % (sub, "error" if line.get("is_error") else "ok")
    return (kind, sub), (frozenset(line), frozenset(inner) if isinstance(inner, dict) else None)


@unittest.skipUnless(os.path.isdir(RECORDINGS), "the recorded CLI output is not beside the repo")
class FakeFidelityTest(unittest.TestCase):
    """Every kind of line the fake prints has exactly the keys the real CLI's line of that kind
    has in the recordings. This is what keeps the fake honest when the recordings change."""

    CASES = [("c-streamjson-partial", "hi"), ("j1-thinking-partial", "[[fake:thinking]]"),
             ("e1-err401-streamjson", "[[fake:err401]]"),
             ("e2-err529-streamjson-default", "[[fake:err529]]"),
             ("e5-err400-streamjson", "[[fake:toolong]]"),
             ("nocred-new-streamjson", "[[fake:notloggedin]]"),
             ("e3-err529-retry2-streamjson", "[[fake:retry]][[fake:err529]]"),
             ("g1-maxturns1", "[[fake:maxturns]]")]
    # Keys the CLI writes in the proxy's mode (prompt on stdin as stream-json) but not in the
    # recordings' (prompt on argv); EndToEndTest.test_the_fake_speaks_like_the_real_cli checks
    # those against the live CLI.
    PROXY_MODE_ONLY = frozenset({"begun_message_ids"})
    # Recorded without --include-partial-messages, so only its rate_limit_event is comparable.
    RATE_LIMIT = ("o-auth-CLAUDE_CODE_OAUTH_TOKEN", "[[fake:ratelimit_info]]")

    def recorded(self, name):
        with open(os.path.join(RECORDINGS, name + ".stdout")) as f:
            return [json.loads(line) for line in f if line.strip()]

    def test_fake_lines_have_the_recorded_keys(self):
        for name, prompt in self.CASES + [self.RATE_LIMIT]:
            real = {}
            for line in self.recorded(name):
                shape, keys = line_shape(line)
                real.setdefault(shape, keys)
            ours = [fake.init_line({"--tools": ""}, "claude-opus-5-5")] + fake_lines(prompt)
            for line in ours:
                shape, keys = line_shape(line)
                if shape not in real or (name, prompt) == self.RATE_LIMIT and \
                        shape[0] != "rate_limit_event":
                    continue  # a kind this recording does not show (another case covers it)
                self.assertEqual((keys[0] ^ real[shape][0]) - self.PROXY_MODE_ONLY, frozenset(),
                                 "%s %s: top-level keys differ" % (name, shape))
                if real[shape][1] is not None and keys[1] is not None:
                    self.assertEqual(keys[1] ^ real[shape][1], frozenset(),
                                     "%s %s: payload keys differ" % (name, shape))

    # Recorded in the proxy's own mode (its flags, the prompt as a stream-json line), with
    # CLAUDE_CODE_MAX_RETRIES as given.
    PROXY_MODE = [("p-answer", "hi", "10"), ("p-thinking", "[[fake:thinking]]", "10"),
                  ("p-err401", "[[fake:err401]]", "10"),
                  ("p-midstream-cut-noretry", "[[fake:words:12]][[fake:cut:5]]", "0"),
                  ("p-midstream-cut-retry", "[[fake:words:12]][[fake:cut:5]]", "2")]

    def test_the_fake_prints_what_the_proxy_mode_recordings_show(self):
        opts = {"--tools": "", "--disable-slash-commands": True, "--safe-mode": True}
        for name, prompt, retries in self.PROXY_MODE:
            with mock.patch.dict(os.environ, {"CLAUDE_CODE_MAX_RETRIES": retries}):
                ours = [fake.ui_invalidate(), fake.init_line(opts, "m")] + fake_lines(prompt)
            # The CLI copies the API's request-id header into assistant lines: the recording
            # lab's API sent none while streaming, the end-to-end test's always does.
            assert_same_lines(self, ours, self.recorded(name), name, ignore={"request_id"})

    def test_recorded_broken_streams_fold_into_the_whole_answer_once(self):
        for name in ("p-midstream-cut-noretry", "p-midstream-cut-retry"):
            events = list(proxy.completion_events(self.recorded(name)))
            body = collected(events)
            self.assertEqual(body["choices"][0]["message"]["content"],
                             " ".join("w%d" % i for i in range(12)), name)
            self.assertEqual("".join(texts(events)), body["choices"][0]["message"]["content"])
            # The final message's usage (12 + 3 + 5 in, 17 out), not the result's sum over
            # every attempt (the result says 36 + 9 + 15 in after three calls).
            self.assertEqual((body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]),
                             (20, 17), name)

    def test_every_kind_the_fake_prints_was_recorded(self):
        real = set()
        for name, _ in self.CASES + [self.RATE_LIMIT]:
            real.update(line_shape(line)[0] for line in self.recorded(name))
        for _, prompt in self.CASES + [self.RATE_LIMIT, ("", "[[fake:twoturns]]"),
                                       ("", "[[fake:connrefused]][[fake:cache]]")]:
            for line in fake_lines(prompt):
                self.assertIn(line_shape(line)[0], real,
                              "the fake prints a kind of line never recorded")
