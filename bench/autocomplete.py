"""Autocomplete benchmark: ``python -m bench.autocomplete [--users 100000] [--queries 20000]``.

Builds a :class:`flannel.autocomplete.UserIndex` of ``--users`` seeded users with realistic
names (about 70% ASCII, 20% accented Latin, 10% CJK: Japanese, Chinese and Korean; 1%
deactivated), a ``--members``-member channel (default 1,000) and ``--recent`` recent contacts
(default 20), then times ``complete()`` (limit 10, the caller excluded) over ``--queries``
queries: 1 to 4 characters taken from the start of a real handle, display name or real-name
word, typed as written (accents, capitals), plus about 5% misses. A warm-up of up to 1,000
queries runs first, untimed. The garbage collector stays on, as in a server.

Also measured: the empty query (what a client shows after "@"); the first query on a fresh
index of each of the 10 commonest first letters of name words and the 10 commonest first CJK
characters (a long name range fills its cache of first matches once); build time (the
constructor: fold every name, one sort); memory per user (``tracemalloc``: what a second
build keeps, over the number of users indexed); and ``upsert`` latency (a display-name
change, which moves keys, and a no-op profile change).

Goal (issue 8): p99 under 1 ms on a 100,000-user workspace. One process, one thread, no
sockets; every loop is bounded by the arguments.

Results: ``bench/results/autocomplete-<date>.json``; a Markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

from chat.wire import User
from flannel.autocomplete import UserIndex
from flannel.text import fold, is_cjk, words

RESULTS = Path(__file__).resolve().parent / "results"

ASCII_FIRST = (
    "James Mary John Patricia Robert Jennifer Michael Linda William Elizabeth David Barbara "
    "Richard Susan Joseph Jessica Thomas Sarah Charles Karen Christopher Nancy Daniel Lisa "
    "Matthew Betty Anthony Margaret Mark Sandra Donald Ashley Steven Kimberly Paul Emily Andrew "
    "Donna Joshua Michelle Kenneth Carol Kevin Amanda Brian Melissa George Deborah Timothy "
    "Stephanie Ronald Rebecca Edward Sharon Jason Laura Jeffrey Cynthia Ryan Kathleen Jacob Amy "
    "Gary Angela Nicholas Shirley Eric Anna Jonathan Brenda Stephen Pamela Larry Emma Justin "
    "Nicole Scott Helen Brandon Samantha Benjamin Katherine Samuel Christine Gregory Debra "
    "Alexander Rachel Frank Carolyn Patrick Janet Raymond Catherine Jack Maria Dennis Heather "
    "Grace Ada Alan Barbara Ken Dennis Linus Guido Margaret Radia Tim Vint Frances Edsger"
).split()
ASCII_LAST = (
    "Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez "
    "Gonzalez Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson White Harris "
    "Sanchez Clark Ramirez Lewis Robinson Walker Young Allen King Wright Scott Torres Nguyen Hill "
    "Flores Green Adams Nelson Baker Hall Rivera Campbell Mitchell Carter Roberts Gomez Phillips "
    "Evans Turner Diaz Parker Cruz Edwards Collins Reyes Stewart Morris Morales Murphy Cook "
    "Rogers Gutierrez Ortiz Morgan Cooper Peterson Bailey Reed Kelly Howard Ramos Kim Cox Ward "
    "Richardson Watson Brooks Chavez Wood James Bennett Gray Mendoza Ruiz Hughes Price Alvarez "
    "Castillo Sanders Patel Myers Long Ross Foster Jimenez Hopper Lovelace Turing Liskov Knuth"
).split()
ACCENTED_FIRST = (
    "José María Zoë François Søren Łukasz Jürgen Björn Chloé Renée Inés Andrés Ángel Mónica "
    "Íñigo Håkon Øystein Ærin Dvořák Zdeněk Jiří Tomás Raúl Noël Anaïs Gaël Müge Çağla Şükrü "
    "Ömer Gökhan Élodie Hélène Jérôme Loïc Benoît Cécile Ségolène Stéphane Thérèse Ørjan Ása "
    "Sigríður Þóra Ðorđe Miloš Dušan Ivana Małgorzata Paweł Wojciech Agnieszka Kateřina"
).split()
ACCENTED_LAST = (
    "García Müller Straße Strauß Núñez Peña Gómez Pérez Jiménez Fernández Martínez Dvořák "
    "Novák Černý Łukaszewski Wójcik Kowalczyk Lewandowski Sørensen Ødegaard Ærø Åberg Björk "
    "Lefèvre Lefébure Dubois Bélanger Gagné Côté Çelik Şahin Öztürk Jóhannsdóttir "
    "Yılmaz Kılıç "  # noqa: RUF001 (the dotless i of Turkish names is meant)
    "Þórsson Guðmundsson Đorđević Petrović Jovanović Nováková Hájek Schröder Köhler Weiß Groß"
).split()
# (written, romanized) pairs; Japanese family + given names, Chinese, Korean.
JA_FAMILY = [
    ("山田", "yamada"), ("田中", "tanaka"), ("佐藤", "sato"), ("鈴木", "suzuki"),
    ("高橋", "takahashi"), ("渡辺", "watanabe"), ("伊藤", "ito"), ("中村", "nakamura"),
    ("小林", "kobayashi"), ("加藤", "kato"), ("山本", "yamamoto"), ("後藤", "goto"),
]  # fmt: skip
JA_GIVEN = [
    ("太郎", "taro"), ("花子", "hanako"), ("健", "ken"), ("美咲", "misaki"), ("翔太", "shota"),
    ("陽菜", "hina"), ("大輔", "daisuke"), ("さくら", "sakura"), ("ゆうき", "yuki"),
]  # fmt: skip
ZH_FAMILY = [
    ("王", "wang"), ("李", "li"), ("张", "zhang"), ("刘", "liu"), ("陈", "chen"),
    ("杨", "yang"), ("黄", "huang"), ("赵", "zhao"),
]  # fmt: skip
ZH_GIVEN = [
    ("伟", "wei"), ("芳", "fang"), ("娜", "na"), ("秀英", "xiuying"), ("敏", "min"),
    ("静", "jing"), ("强", "qiang"), ("磊", "lei"),
]  # fmt: skip
KO_FAMILY = [("김", "kim"), ("이", "lee"), ("박", "park"), ("최", "choi"), ("정", "jung")]
KO_GIVEN = [("민준", "minjun"), ("서연", "seoyeon"), ("지훈", "jihoon"), ("하은", "haeun")]

MISSES = ["qx", "zzq", "xqj", "qqqq", "vvx", "wq", "jjjx", "ǂ", "ꙮ", "🙂"]
WARMUP = 1_000


def _ascii(s: str) -> str:
    return "".join(c for c in fold(s) if c.isascii() and c.isalnum())


def make_user(rng: random.Random, uid: int, taken: set[str]) -> User:
    """One user with a realistic name; its handle is unique (a number is added if needed)."""
    r = rng.random()
    if r < 0.7 or r >= 0.9:
        if r < 0.7:
            first, last = rng.choice(ASCII_FIRST), rng.choice(ASCII_LAST)
        else:
            first, last = rng.choice(ACCENTED_FIRST), rng.choice(ACCENTED_LAST)
        f, la = _ascii(first), _ascii(last)
        style = rng.randrange(4)
        base = (f"{f}.{la}", f"{f[0]}{la}", f"{f}{la[0]}", f"{f}_{la}")[style]
        display = rng.choice([f"{first} {last}", first, f"{first} {last[0]}."])
        real = f"{first} {last}"
    else:
        script = rng.randrange(3)
        fam, giv = [(JA_FAMILY, JA_GIVEN), (ZH_FAMILY, ZH_GIVEN), (KO_FAMILY, KO_GIVEN)][script]
        (fw, fr), (gw, gr) = rng.choice(fam), rng.choice(giv)
        base = f"{fr}.{gr}" if rng.random() < 0.5 else f"{gr}{fr}"
        display = fw + gw
        real = f"{fw} {gw}" if script == 0 else fw + gw
    handle = base
    n = 1
    while handle in taken:  # bounded: one more number each time, at most one per user
        n += 1
        handle = f"{base}{n}"
    taken.add(handle)
    return User(
        id=uid,
        workspace_id=1,
        handle=handle,
        display_name=display,
        real_name=real,
        role="member",
        deactivated=rng.random() < 0.01,
    )


def make_queries(rng: random.Random, users: list[User], count: int) -> list[tuple[str, str]]:
    """(kind, query) pairs: a miss, or a 1- to 4-character prefix of a real name."""
    queries: list[tuple[str, str]] = []
    for _ in range(count):
        if rng.random() < 0.05:
            queries.append(("miss", rng.choice(MISSES)))
            continue
        u = rng.choice(users)
        source = rng.choice([u.handle, u.display_name, *u.real_name.split()])
        q = source[: rng.randint(1, 4)]
        queries.append((f"{len(q)} char{'s' if len(q) > 1 else ''}", q))
    return queries


def pct(sorted_ns: list[int], p: float) -> float:
    """The p-th percentile (nearest rank) of sorted nanoseconds, in microseconds."""
    if not sorted_ns:
        return float("nan")
    i = min(len(sorted_ns), max(1, math.ceil(p / 100 * len(sorted_ns)))) - 1
    return sorted_ns[i] / 1000


def summary(ns: list[int]) -> dict[str, Any]:
    s = sorted(ns)
    return {
        "n": len(s),
        "p50_us": pct(s, 50),
        "p99_us": pct(s, 99),
        "max_us": s[-1] / 1000 if s else float("nan"),
        "mean_us": statistics.fmean(s) / 1000 if s else float("nan"),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    taken: set[str] = set()
    users = [make_user(rng, uid, taken) for uid in range(1, args.users + 1)]
    ids = [u.id for u in users]
    members = set(rng.sample(ids, min(args.members, len(ids))))
    recent = rng.sample(ids, min(args.recent, len(ids)))
    caller = ids[0]

    t0 = time.perf_counter()
    idx = UserIndex(users)
    build_s = time.perf_counter() - t0

    gc.collect()
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    probe = UserIndex(users)
    after, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    bytes_per_user = (after - before) / max(1, len(probe))
    del probe
    gc.collect()

    queries = make_queries(rng, users, args.queries)
    for _, q in queries[:WARMUP]:
        idx.complete(q, limit=args.limit, channel_members=members, recent=recent, exclude=(caller,))
    by_kind: dict[str, list[int]] = {}
    every: list[int] = []
    empty = 0
    clock = time.perf_counter_ns
    for kind, q in queries:
        t = clock()
        got = idx.complete(
            q, limit=args.limit, channel_members=members, recent=recent, exclude=(caller,)
        )
        took = clock() - t
        every.append(took)
        by_kind.setdefault(kind, []).append(took)
        empty += not got

    at_sign: list[int] = []  # what a client shows after typing only "@"
    for _ in range(min(1_000, args.queries)):
        t = clock()
        idx.complete("", limit=args.limit, channel_members=members, recent=recent)
        at_sign.append(clock() - t)

    # A query whose name range is long answers from the first matches it cached; the first
    # such query after a build pays the range once. Time that on a fresh index for the 10
    # commonest first letters of name words, and the 10 commonest first CJK characters
    # (their matches are by name only: handles are romanized).
    firsts = Counter(w[0] for u in users for w in words(fold(f"{u.display_name} {u.real_name}")))
    cjk = Counter({c: k for c, k in firsts.items() if is_cjk(c)})
    fresh = UserIndex(users)
    cold: list[int] = []
    for letter, _ in firsts.most_common(10) + cjk.most_common(10):
        t = clock()
        fresh.complete(letter, limit=args.limit, channel_members=members, recent=recent)
        cold.append(clock() - t)
    del fresh

    upsert_moved: list[int] = []
    upsert_same: list[int] = []
    for u in rng.sample(users, min(1_000, len(users))):
        changed = u.model_copy(update={"display_name": u.display_name + " Jr"})
        t = clock()
        idx.upsert(changed)
        upsert_moved.append(clock() - t)
        same = changed.model_copy(update={"tz": "Europe/Paris"})
        t = clock()
        idx.upsert(same)
        upsert_same.append(clock() - t)

    return {
        "users": args.users,
        "indexed": len(idx),
        "members": len(members),
        "recent": len(recent),
        "queries": len(queries),
        "empty_answers": empty,
        "build_s": build_s,
        "bytes_per_user": bytes_per_user,
        "complete": summary(every),
        "complete_by_kind": {k: summary(v) for k, v in sorted(by_kind.items())},
        "complete_empty_query": summary(at_sign),
        "complete_cold_first_letters": summary(cold),
        "upsert_keys_moved": summary(upsert_moved),
        "upsert_no_key_change": summary(upsert_same),
    }


def markdown(r: dict[str, Any], args: argparse.Namespace) -> str:
    c = r["complete"]
    verdict = "yes" if c["p99_us"] < 1000 else "NO"
    lines = [
        f"UserIndex.complete() on {r['indexed']:,} active users ({r['users']:,} seeded), "
        f"{r['members']:,}-member channel, {r['recent']} recent contacts, limit {args.limit}, "
        f"{r['queries']:,} queries ({r['empty_answers']:,} with no match).",
        "",
        "| queries | n | p50 (µs) | p99 (µs) | max (µs) |",
        "|---|---:|---:|---:|---:|",
        f"| **all** | {c['n']:,} | **{c['p50_us']:.1f}** | **{c['p99_us']:.1f}** "
        f"| {c['max_us']:.1f} |",
    ]
    rows = [(k, v) for k, v in r["complete_by_kind"].items()]
    rows += [
        ('"" (just "@")', r["complete_empty_query"]),
        (
            "cold: 1st query on a fresh index, 10+10 commonest letters",
            r["complete_cold_first_letters"],
        ),
        ("upsert, display name changed", r["upsert_keys_moved"]),
        ("upsert, no key changed", r["upsert_no_key_change"]),
    ]
    for label, s in rows:
        lines.append(
            f"| {label} | {s['n']:,} | {s['p50_us']:.1f} | {s['p99_us']:.1f} | {s['max_us']:.1f} |"
        )
    lines += [
        "",
        f"Build: {r['build_s']:.2f} s; memory: {r['bytes_per_user']:,.0f} bytes per user "
        f"(tracemalloc). p99 under 1 ms: **{verdict}**.",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.autocomplete",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--users", type=int, default=100_000, help="users seeded (default 100,000)")
    p.add_argument("--queries", type=int, default=20_000, help="timed queries (default 20,000)")
    p.add_argument("--members", type=int, default=1_000, help="channel members (default 1,000)")
    p.add_argument("--recent", type=int, default=20, help="recent contacts (default 20)")
    p.add_argument("--limit", type=int, default=10, help="results per query (default 10)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument(
        "--out", type=Path, help="JSON output (default bench/results/autocomplete-<date>)"
    )
    args = p.parse_args(argv)
    if args.users < 1 or args.queries < 1:
        p.error("--users and --queries must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now()
    load = os.getloadavg()
    print(f"# load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    result = run(args)
    table = markdown(result, args)
    out = args.out or RESULTS / f"autocomplete-{started:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "autocomplete",
        "started": started.isoformat(timespec="seconds"),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg_before": load,
        },
        "result": result,
        "table_md": table,
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print()
    print(table)
    print(f"\n# results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
