#!/usr/bin/env python3
"""A stand-in for the Paheko plugin, for scripts/demo: prints each event it receives.

Checks the shared secret (X-Paheko-Secret), answers 204, and drops a repeated
Idempotency-Key as the real plugin should. Usage: receiver.py PORT_FILE SECRET
(it listens on a free port of 127.0.0.1 and writes that port to PORT_FILE).
"""
import http.server
import json
import sys

PORT_FILE, SECRET = sys.argv[1], sys.argv[2]
SEEN = set()


def euros(cents):
    return f"{cents / 100:.2f} €" if isinstance(cents, (int, float)) else "?"


def describe(kind, p):
    if kind == "pos.session.opened":
        return f"session {p.get('session_id')} opened by {p.get('operator_id')}, float {euros(p.get('initial_amount'))}"
    if kind == "pos.ticket.created":
        items = p.get("items", [])
        total = sum(i.get("total_price", 0) for i in items)
        pay = ", ".join(f"{x.get('method')} {euros(x.get('amount'))}" for x in p.get("payments", []))
        return f"ticket {p.get('sale_id')}: {len(items)} item(s), {euros(total)} paid by {pay}"
    if kind == "pos.session.closed":
        return (f"session {p.get('session_id')} closed: {p.get('total_items')} items, "
                f"sales {euros(p.get('total_sales'))}, counted {euros(p.get('actual_amount'))}")
    return json.dumps(p)[:100]


class Plugin(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("X-Paheko-Secret") != SECRET:
            status = 401
            print("  refused: wrong or missing secret", flush=True)
        else:
            status = 204
            key = self.headers.get("Idempotency-Key")
            kind = self.headers.get("X-Paheko-Event", "?")
            if key in SEEN:
                print(f"  {key}  (repeat, ignored)", flush=True)
            else:
                SEEN.add(key)
                print(f"  {key}  {kind:<20} {describe(kind, json.loads(body))}", flush=True)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Plugin)
with open(PORT_FILE, "w") as f:
    f.write(str(server.server_address[1]))
server.serve_forever()
