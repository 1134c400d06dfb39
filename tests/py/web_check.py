"""Drives Pollen's web page in headless Chromium through the DevTools protocol.

usage: web_check.py CHROMIUM PAGE_URL QUESTION MAX_TOKENS SCREENSHOT [once]

Types QUESTION into the chat and presses Enter, watches the answer stream in, and
prints one JSON line: the answer, the partial texts seen while it streamed, and the
swarm bar's per-block server counts. Then it waits for a line on stdin (a server was
stopped), watches the bar until it changes, saves a screenshot, and prints a second
JSON line with the new counts and every URL the page requested. With `once`, it
stops after the first line.
"""

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import websocket

chromium, url, question, max_tokens, screenshot = sys.argv[1:6]
profile = tempfile.mkdtemp(prefix="pollen-chromium-")
browser = subprocess.Popen([
    chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
    "--no-first-run", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--remote-debugging-port=0", "--remote-allow-origins=*",
    "--window-size=1280,900", "--user-data-dir=" + profile, "about:blank",
], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def fail(msg):
    browser.kill()
    shutil.rmtree(profile, ignore_errors=True)
    sys.exit(msg)


port_file = os.path.join(profile, "DevToolsActivePort")
deadline = time.time() + 60
while not (os.path.exists(port_file) and open(port_file).read().count("\n") >= 1):
    if time.time() > deadline or browser.poll() is not None:
        fail("chromium did not open its DevTools port")
    time.sleep(0.1)
port = open(port_file).read().split("\n")[0].strip()
pages = []
while not pages:
    pages = [t for t in json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
             if t["type"] == "page"]
    time.sleep(0.1)
ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
next_id = 0
requested = []


def cdp(method, **params):
    global next_id
    next_id += 1
    ws.send(json.dumps({"id": next_id, "method": method, "params": params}))
    while True:
        msg = json.loads(ws.recv())
        if msg.get("method") == "Network.requestWillBeSent":
            requested.append(msg["params"]["request"]["url"])
        if msg.get("id") == next_id:
            if "error" in msg:
                fail(f"{method}: {msg['error']}")
            return msg.get("result", {})


def js(expr):
    r = cdp("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
    if "exceptionDetails" in r:
        fail(f"{expr}: {r['exceptionDetails']}")
    return r["result"].get("value")


def wait(expr, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = js(expr)
        if v:
            return v
        time.sleep(0.05)
    fail("timed out waiting for " + what)


BAR = "[...document.querySelectorAll('.bar .cell')].map(c => Number(c.dataset.count))"

cdp("Network.enable")
cdp("Page.enable")
cdp("Page.navigate", url=url)
wait("document.querySelectorAll('.bar .cell').length > 0", 30, "the swarm bar")
bar_before = js(BAR)
js(f"document.getElementById('max-tokens').value = {int(max_tokens)}")
js("document.getElementById('temperature').value = 0")
js("document.getElementById('question').focus()")
cdp("Input.insertText", text=question)
for kind in ("keyDown", "keyUp"):
    cdp("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter",
        windowsVirtualKeyCode=13, nativeVirtualKeyCode=13, **({"text": "\r"} if kind == "keyDown" else {}))
wait("document.querySelector('.msg.assistant') !== null", 10, "the answer to start")
partials = []
deadline = time.time() + 120
while time.time() < deadline:
    text, state = js("(() => { const m = document.querySelector('.msg.assistant'); return [m.textContent, m.dataset.state]; })()")
    if text and (not partials or partials[-1] != text):
        partials.append(text)
    if state == "done":
        break
    time.sleep(0.03)
else:
    fail("the answer never finished")
errors = js("[...document.querySelectorAll('.msg.error')].map(e => e.textContent)")
print(json.dumps({"answer": partials[-1] if partials else "", "partials": partials,
                  "errors": errors, "bar": bar_before,
                  "status": js("document.getElementById('chat-status').textContent")}), flush=True)

def close():
    ws.close()
    browser.kill()
    browser.wait()
    shutil.rmtree(profile, ignore_errors=True)


if sys.argv[6:7] == ["once"]:
    close()
    sys.exit(0)

sys.stdin.readline()
deadline = time.time() + 60
bar_after = bar_before
while time.time() < deadline:
    bar_after = js(BAR)
    if bar_after != bar_before:
        break
    time.sleep(0.25)
time.sleep(0.5)
png = cdp("Page.captureScreenshot", format="png")["data"]
with open(screenshot, "wb") as f:
    f.write(base64.b64decode(png))
rows = js("document.querySelectorAll('#models tbody tr').length")
other_rows = js("document.querySelectorAll('#models tbody tr.other-mode').length")
print(json.dumps({"bar": bar_after, "rows": rows, "other_rows": other_rows,
                  "requested": requested}), flush=True)
close()
