#!/usr/bin/env python3
"""The demo's local service (standard library only): three endpoints a workflow calls, and
their compensations. Usage: demo_service.py PORT

  POST /inventory/reserve   200 {"reservation_id": ...}
  POST /inventory/release   200 {"released": ...}
  POST /payments/charge     503 (Retry-After: 1) on the first attempt, then 200 {"charge_id": ...}
  POST /payments/refund     200 {"refunded": ...}
  POST /shipping/label      200 {"label": ...}, or 422 when the address is "nowhere"

Every request is printed with its dispatched headers.
"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body, headers=()):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(n) or b"null")
        run = self.headers.get("Dispatched-Run", "")
        attempt = self.headers.get("Dispatched-Attempt", "")
        print(f"  service <- POST {self.path} attempt={attempt} key={self.headers.get('Idempotency-Key')} body={json.dumps(body)}", flush=True)
        if self.path == "/inventory/reserve":
            return self.reply(200, {"reservation_id": "res_" + run[-6:]}, [("Dispatched-Log", "reserved 1 item")])
        if self.path == "/inventory/release":
            return self.reply(200, {"released": body.get("reservation_id")})
        if self.path == "/payments/charge":
            if attempt == "1":
                return self.reply(503, {"error": "payment provider busy"}, [("Retry-After", "1")])
            return self.reply(200, {"charge_id": "ch_" + run[-6:], "amount": body.get("amount")})
        if self.path == "/payments/refund":
            return self.reply(200, {"refunded": body.get("charge_id")})
        if self.path == "/shipping/label":
            if body.get("address") == "nowhere":
                return self.reply(422, {"error": "address not deliverable"})
            return self.reply(200, {"label": "LBL-" + run[-6:]})
        return self.reply(404, {"error": "no such endpoint"})


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
