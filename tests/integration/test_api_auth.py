"""Auth and request limits over real HTTP: tokens on every write, on reads unless the dashboard is
public; 401 for a wrong or revoked token; 413 by Content-Length and by streamed size."""

from __future__ import annotations

import socket

from farm.tokens import hash_token, revoke_token

READS = ["/programs", "/programs/1", "/programs/1/experiments", "/experiments/1", "/programs/1/results.tsv",
         "/programs/1/progress.svg", "/programs/1/progress.png", "/workers", "/metrics"]
WRITES = [("/programs", {"name": "x", "instructions": "y"}), ("/programs/1/pause", None),
          ("/programs/1/resume", None), ("/programs/1/stop", None),
          ("/programs/1/candidates", {"description": "d", "files": {"train.py": "x = 1\n"}})]


def test_private_deployment(live_api):
    anon, wrong = live_api.client(token=None), live_api.client(token="rf_wrong")
    for path in READS:
        for client in (anon, wrong):
            r = client.get(path)
            assert r.status_code == 401, (path, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer" and r.json()["detail"]
    for path, body in WRITES:
        assert anon.post(path, json=body).status_code == 401
        assert wrong.post(path, json=body).status_code == 401
    assert live_api.client().get("/programs").status_code == 200
    assert anon.get("/healthz").status_code == 200  # health needs no token


def test_public_dashboard_reads(start_api):
    live = start_api(public_dashboard=True)
    anon = live.client(token=None)
    assert anon.get("/programs").status_code == 200 and anon.get("/workers").status_code == 200
    assert anon.get("/programs/1").status_code == 404  # read allowed, the id is just unknown
    assert live.client(token="rf_wrong").get("/programs").status_code == 401  # a wrong token is still wrong
    for path, body in WRITES:
        assert anon.post(path, json=body).status_code == 401


def test_tokens_hashed_and_revocable(live_api):
    from farm.models import ApiToken

    with live_api.session() as s:
        row = s.query(ApiToken).one()
        assert row.token_hash == hash_token(live_api.token) and live_api.token not in (row.token_hash, row.prefix)
    c = live_api.client()
    assert c.get("/programs").status_code == 200
    with live_api.session() as s:
        assert s.query(ApiToken).one().last_used_at is not None
        assert revoke_token(s, name=row.name)
    assert c.get("/programs").status_code == 401


def test_body_limit(start_api):
    live = start_api(max_body_bytes=2000)
    c = live.client()
    big = {"name": "big", "instructions": "x" * 5000}
    r = c.post("/programs", json=big)
    assert r.status_code == 413 and "2000" in r.json()["detail"]
    assert c.post("/programs", json={"name": "ok", "instructions": "x" * 100}).status_code == 201

    def chunks():
        yield b'{"name": "s", "instructions": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}'

    r = c.post("/programs", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413  # no Content-Length: counted as it streams

    # a client that lies: declares 100 bytes and sends 5000
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        body = b'{"name": "liar", "instructions": "' + b"x" * 5000 + b'"}'
        sock.sendall(b"POST /programs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + live.token.encode() + b"\r\nContent-Length: 100\r\n\r\n" + body)
        reply = sock.recv(4096)
    assert not reply.startswith(b"HTTP/1.1 201")  # the server reads 100 bytes: invalid JSON, never a program
    assert c.get("/programs").json()[0]["name"] == "ok" and len(c.get("/programs").json()) == 1


def test_private_dashboard_reveals_no_ids(live_api):
    # the login check comes before the lookup: an existing and a missing id answer alike
    pid = live_api.client().post("/programs", json={"name": "p", "instructions": "y"}).json()["id"]
    anon = live_api.client(token=None, follow_redirects=False)
    for ref in (str(pid), "999", "%C2%B3"):
        r = anon.get(f"/ui/programs/{ref}")
        assert r.status_code == 303 and r.headers["location"].startswith("/login"), (ref, r.status_code)
        assert anon.get(f"/ui/programs/{ref}/live").status_code == 401, ref
    with live_api.session() as s:
        from farm.models import Program
        from tests.factories import make_experiment

        eid = make_experiment(s, s.get(Program, pid)).id
    for ref in (str(eid), "999"):
        assert anon.get(f"/ui/experiments/{ref}").status_code == 401, ref


def test_public_dashboard_ignores_a_stale_cookie(start_api):
    # the public page renders for a browser whose login cookie went stale; the plot and the
    # results.tsv it links to must too. A wrong bearer token is still refused.
    live = start_api(public_dashboard=True)
    pid = live.client().post("/programs", json={"name": "p", "instructions": "y"}).json()["id"]
    stale = live.client(token=None, cookies={"farm_token": "rf_revoked"})
    assert stale.get(f"/ui/programs/{pid}").status_code == 200
    for path in (f"/programs/{pid}", f"/programs/{pid}/progress.svg", f"/programs/{pid}/results.tsv"):
        assert stale.get(path).status_code == 200, path
        assert live.client(token="rf_wrong").get(path).status_code == 401, path


def test_a_write_with_the_cookie_from_another_page_of_the_same_site_is_refused(live_api):
    """Found by review: SameSite keeps the dashboard's cookie from other sites, but a page on another port of the same
    host (a notebook on localhost:8888) is the same site: its plain form POST to /programs/1/stop went through with
    the cookie. A cookie write must now come from the dashboard's own origin; a bearer token is not affected."""
    c = live_api.client()
    pid = c.post("/programs", json={"name": "csrf", "instructions": "# go"}).json()["id"]
    browser = live_api.client(token=None, cookies={"farm_token": live_api.token})
    own = live_api.url.split("://", 1)[1]
    for headers in ({"Origin": "http://localhost:9999"}, {"Sec-Fetch-Site": "same-site"},
                    {"Sec-Fetch-Site": "cross-site", "Origin": f"http://{own}"}):
        r = browser.post(f"/programs/{pid}/pause", headers=headers)
        assert r.status_code == 403 and "bearer token" in r.json()["detail"], (headers, r.text)
    assert c.get(f"/programs/{pid}").json()["status"] == "active"
    assert browser.get(f"/programs/{pid}", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200  # reads are
    # not writes (a cross-site page cannot read the answer)
    assert browser.post(f"/programs/{pid}/pause", headers={"Sec-Fetch-Site": "same-origin"}).status_code == 200
    assert browser.post(f"/programs/{pid}/resume", headers={"Origin": f"http://{own}"}).status_code == 200
    assert c.post(f"/programs/{pid}/pause", headers={"Origin": "http://localhost:9999"}).status_code == 200
