"""RESULTS.md checks itself against results/: every results/ path it names exists, every table it
copies from a report (results/steps_tables.md, fair_toy.md, table1_mnist.md) equals the report's table now,
the resolution rows are those of resolution_toy.md, every claim marker
(<!-- claim FILE KEY*SCALE = VALUE -->) equals its JSON value at the printed precision, and no
report is older than a run it reads. `python -m experiments.reproduce --check` runs it,
`--sync-tables` rewrites the copied tables from the reports.
"""
import glob
import os
import re

import runtime as R
from experiments.protocol import RES, ROOT, read_json


def check_results(md_path=os.path.join(ROOT, 'RESULTS.md'), res=None):
    """What in RESULTS.md disagrees with results/ (an empty list: nothing): every results/ path it
    names exists; every table it copies from a report (a bold heading of results/steps_tables.md)
    equals that report's table now; the resolution table's rows are those of resolution_toy.md;
    and no table or figure of the step-count report is older than a run JSON it reads."""
    res, text, bad = res or RES, open(md_path).read(), []
    for path in sorted(set(re.findall(r'results/[A-Za-z0-9_./*{},-]*[A-Za-z0-9_*}/]', text))):
        if not glob.glob(os.path.join(os.path.dirname(res), path.replace('{', '*').split(',')[0].split('}')[0])):
            bad.append(f'RESULTS.md names {path}, which results/ does not hold')
    tables, sections = os.path.join(res, 'steps_tables.md'), report_tables(res)
    for head, body in bold_tables(text):
        if head in sections and body.strip() != sections[head][1].strip():
            bad.append(f'RESULTS.md table "{head[:60]}" differs from results/{sections[head][0]}: rerun the report and copy it')
    for path, key, scale, value in re.findall(r'<!-- claim (\S+) (\S+?)(?:\*(\S+))? = ([+-]?[0-9.]+) -->', text):
        got = claim_value(os.path.join(os.path.dirname(res), path), key)
        digits = len(value.split('.')[1]) if '.' in value else 0
        if got is None or round(got * float(scale or 1), digits) != float(value):
            bad.append(f'RESULTS.md claims {key} = {value} in {path}; it holds {got}: rerun the report and correct the text')
    rows = [ln for ln in text.split('\n') if re.match(r'^\| \w+ \| (1000|50) \| (gaussian|laplace) \|', ln)]
    made = os.path.join(res, 'resolution_toy.md')
    if rows and os.path.isfile(made):   # the resolution table: copied from the report, row for row
        want = [ln for ln in open(made).read().split('\n') if ln.startswith('| ') and not ln.startswith('| set ')]
        bad += [f'RESULTS.md resolution row "{ln[:40]}" is not in resolution_toy.md' for ln in rows if ln not in want]
        if len(rows) != len(want):
            bad.append(f'RESULTS.md has {len(rows)} resolution rows, resolution_toy.md {len(want)}')
    for report, runs, cmd in (('fair_toy.md', 'fair*', '--fair'), ('table1_mnist.md', 'table1', '--table1')):
        runs = glob.glob(os.path.join(res, runs, '*.json'))
        if runs and os.path.isfile(os.path.join(res, report)) and \
                os.path.getmtime(os.path.join(res, report)) < max(map(os.path.getmtime, runs)) - 1:
            bad.append(f'results/{report} is older than a run it reads: rerun {cmd} --report')
    runs = glob.glob(os.path.join(res, 'steps', '*.json'))   # (file times: in a fresh clone all equal, so this
    newest = max(map(os.path.getmtime, runs), default=0)      # catches runs added after the report was drawn)
    for out in glob.glob(os.path.join(res, 'steps_*.png')) + [tables]:
        if os.path.isfile(out) and os.path.getmtime(out) < newest - 1:
            bad.append(f'{os.path.relpath(out, ROOT)} is older than a run in results/steps/: rerun --report')
    return bad


def report_tables(res):
    """{heading: (report file, table)} of the reports RESULTS.md copies tables from: steps_tables.md
    (under '### heading'), fair_toy.md and table1_mnist.md (under a bold lead-in)."""
    out, tables = {}, os.path.join(res, 'steps_tables.md')
    if os.path.isfile(tables):
        out = {h.replace('Headline, ', ''): ('steps_tables.md', b.strip().split('\n\n')[0]) for h, b in
               re.findall(r'^### (.+)\n([\s\S]*?)(?=^### |\Z)', open(tables).read(), re.M)}
    for report in ('fair_toy.md', 'table1_mnist.md'):
        if os.path.isfile(os.path.join(res, report)):
            out.update({h: (report, b) for h, b in bold_tables(open(os.path.join(res, report)).read())})
    return out


def sync_tables(md_path=os.path.join(ROOT, 'RESULTS.md'), res=None):
    """Rewrite every table RESULTS.md copies from a report (check_results' rule) with the report's
    table now; the prose is left to its author. Returns the headings replaced."""
    sections, text, done = report_tables(res or RES), open(md_path).read(), []

    def swap(m):
        head = m.group(1)
        if head not in sections or m.group(2).strip() == sections[head][1].strip():
            return m.group(0)
        done.append(head)
        return m.group(0)[:len(m.group(0)) - len(m.group(2))] + sections[head][1].strip() + '\n'
    new = re.sub(r'^\*\*(.+?)\*\*[^\n]*\n\n((?:\|.*\n)+)', swap, text, flags=re.M)
    R.atomic_write(md_path, lambda f: f.write(new), binary=False)
    return done


def bold_tables(md):
    """(bold lead-in, table) for every table that follows a paragraph starting with **lead-in**."""
    return re.findall(r'^\*\*(.+?)\*\*[^\n]*\n\n((?:\|.*\n)+)', md, re.M)


def claim_value(path, key):
    """The number at `key` in JSON file `path`: dotted names, a list element picked by its fields
    (cells[arm=m0.2,S=10]) or by position (ratio[0]); None where there is none. A dot between two digits belongs to the name."""
    try:
        node = read_json(path)
        for part in re.split(r'(?<!\d)\.|\.(?!\d)', key):   # a dot between two digits (m0.2) is part of a name
            name, _, sel = part.partition('[')
            node = node[name] if name else node
            if sel.rstrip(']').isdigit():   # a list element by position: ratio[0]
                node = node[int(sel.rstrip(']'))]
            elif sel:
                want = dict(kv.split('=') for kv in sel.rstrip(']').split(','))
                node = next(c for c in node if all(str(c.get(k)) == v for k, v in want.items()))
        return float(node)
    except (OSError, KeyError, IndexError, StopIteration, TypeError, ValueError):
        return None
