#!/usr/bin/env python3
"""householdAt latency (issue 18): 10 sequential GraphQL queries per instant
against the dev stack, as the owner of the `homelink load` fleet cached in
.state/dev/load/fleet-1x70.json; prints p50 and the max of 10 per instant.

    python3 bench/scripts/household_at.py 2026-12-07T01:15:00Z 2026-12-07T01:30:00Z
"""
import json, os, sys, time, urllib.request, statistics
fleet = json.load(open(os.environ.get('HOMELINK_FLEET', '.state/dev/load/fleet-1x70.json')))
acc = fleet['account']; h = fleet['households'][0]['id']
req = urllib.request.Request('http://127.0.0.1:28080/v1/auth/sign-in', data=json.dumps({'email': acc['email'], 'password': acc['password']}).encode(), headers={'content-type': 'application/json'})
tok = json.load(urllib.request.urlopen(req))['accessToken']
q = 'query($h: ID!, $at: DateTime!) { householdAt(id: $h, at: $at) { eventsFolded fromSnapshot devices { id reported online } } }'
ats = sys.argv[1:] or ['2026-12-07T01:15:00Z']
n = 10
for at in ats:
    times = []
    for i in range(n):
        body = json.dumps({'query': q, 'variables': {'h': h, 'at': at}}).encode()
        r = urllib.request.Request('http://127.0.0.1:28081/graphql', data=body, headers={'content-type': 'application/json', 'authorization': 'Bearer ' + tok})
        t = time.perf_counter(); d = json.load(urllib.request.urlopen(r, timeout=300)); times.append(time.perf_counter() - t)
        assert 'errors' not in d, d
    times.sort()
    print(f"at {at}: from snapshot {d['data']['householdAt']['fromSnapshot']}, events folded {d['data']['householdAt']['eventsFolded']}, devices {len(d['data']['householdAt']['devices'])}, p50 {statistics.median(times)*1000:.0f} ms, p99(max of {n}) {times[-1]*1000:.0f} ms")
