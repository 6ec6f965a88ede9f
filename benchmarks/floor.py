"""The floor: the least a node can do to run pushed code, stdlib only.

``python benchmarks/floor.py DB_URL MAC_ID`` follows one continuous
``_changes`` feed (a ``_selector`` on CouchDB; unfiltered on pouchdb-server,
which crashes on ``_selector``), forks once per program or command and does
nothing else: no supervision, status, journal or log.  bench_daemon.py runs
rounds of it between rounds of the daemon, so their ratio says what the
daemon's own machinery costs, whatever the machine is doing.
"""

import base64
import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request


def follow(db: str, mac: str, use_selector: bool) -> None:
    parts = urllib.parse.urlsplit(db)
    plain = parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))
    headers = {"Accept-Encoding": "identity", "Content-Type": "application/json"}
    if parts.username:
        user, password = (urllib.parse.unquote(x or "") for x in (parts.username, parts.password))
        token = f"{user}:{password}"
        headers["Authorization"] = "Basic " + base64.b64encode(token.encode()).decode()
    base = urllib.parse.urlunsplit(plain)
    query = "feed=continuous&include_docs=true&since=now&heartbeat=10000"
    body = None
    if use_selector:
        query += "&filter=_selector"
        body = json.dumps({"selector": {"type": {"$in": [int(mac), mac, mac + "_cmd"]}}}).encode()
    request = urllib.request.Request(f"{base}/_changes?{query}", data=body, headers=headers,
                                     method="POST" if body else "GET")
    with urllib.request.urlopen(request) as feed:
        print("ready", flush=True)
        for line in feed:
            doc = json.loads(line).get("doc") if line.strip() else None
            if not doc or doc.get("_deleted") or "ret" in doc:
                continue
            if doc.get("type") == mac + "_cmd":
                if os.fork() == 0:
                    done = subprocess.run(doc["cmd"], capture_output=True, text=True)
                    doc.update(ret=[done.stdout, done.stderr], returncode=done.returncode)
                    put = urllib.request.Request(f"{base}/{urllib.parse.quote(doc['_id'])}",
                                                 data=json.dumps(doc).encode(),
                                                 headers=headers, method="PUT")
                    urllib.request.urlopen(put).close()
                    os._exit(0)
            elif str(doc.get("type")) == mac and "code" in doc:
                if os.fork() == 0:
                    namespace: dict = {"__name__": doc.get("name", "program")}
                    exec(compile(doc["code"], doc["_id"], "exec"), namespace)
                    namespace["main"]()
                    os._exit(0)
            try:
                while os.waitpid(-1, os.WNOHANG) != (0, 0):
                    pass
            except ChildProcessError:
                pass


if __name__ == "__main__":
    follow(sys.argv[1].rstrip("/"), sys.argv[2], sys.argv[3:] == ["--selector"])
