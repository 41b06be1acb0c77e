#!/usr/bin/env python3
"""Per-function instructions per message from a callgrind profile of `benches/callgrind_ack.sh`.

callgrind_annotate splits a function's cost by the source file of the code inlined into it;
this sums it per function (symbol), self and inclusive, and counts calls, all divided by the
run's messages.

Usage:
    benches/callgrind_fn.py OUT [REGEX...]             functions matching any REGEX (all if none)
    benches/callgrind_fn.py OUT --callees REGEX...     and what each calls, inclusive

OUT is the prefix callgrind_ack.sh printed (`raw: OUT.callgrind`); the message count comes
from OUT.json. Functions under 3 instructions per message are left out.
"""
import collections
import json
import re
import sys


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    prefix = sys.argv[1]
    args = sys.argv[2:]
    with open(prefix + ".json") as f:
        msgs = json.load(f)["messages"]
    names = {}

    def name(text):
        m = re.match(r"\((\d+)\)(?: (.*))?", text)
        if not m:
            return text
        if m.group(2) is not None:
            names[m.group(1)] = m.group(2)
        return names[m.group(1)]

    own = collections.Counter()
    calls = collections.Counter()
    callees = collections.defaultdict(collections.Counter)
    fn = cfn = None
    call = None
    with open(prefix + ".callgrind") as f:
        for line in f:
            if line.startswith("fn="):
                fn = name(line[3:].rstrip("\n"))
            elif line.startswith("cfn="):
                cfn = name(line[4:].rstrip("\n"))
            elif line.startswith("calls="):
                call = (cfn, int(line[6:].split()[0]))
            elif line[:1].isdigit() or line[:1] in "+-*":
                parts = line.split()
                if len(parts) < 2:
                    continue
                cost = int(parts[1])
                if call:
                    target, n = call
                    call = None
                    calls[target] += n
                    if target != fn:  # recursion: counted once
                        callees[fn][target] += cost
                else:
                    own[fn] += cost
    incl = {f: own[f] + sum(callees[f].values()) for f in set(own) | set(callees)}

    def show(f, indent=""):
        print(f"{indent}{incl[f] / msgs:9.1f} incl {own[f] / msgs:8.1f} self "
              f"{calls[f] / msgs:6.2f} calls  {f[:150]}")

    if args[:1] == ["--callees"]:
        for pattern in args[1:]:
            for f in sorted(incl, key=lambda f: -incl[f]):
                if re.search(pattern, f):
                    show(f)
                    for target, cost in callees[f].most_common():
                        if cost / msgs >= 1:
                            print(f"      {cost / msgs:9.1f}  {target[:140]}")
        return
    print(f"messages: {msgs}")
    for f in sorted(incl, key=lambda f: -incl[f]):
        if incl[f] / msgs < 3:
            break
        if not args or any(re.search(p, f) for p in args):
            show(f)


if __name__ == "__main__":
    main()
