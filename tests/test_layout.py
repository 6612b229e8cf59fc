"""The house rules of the layout, checked against the tree: README's file map names every file
and folder (and nothing that is not there), the top level holds at most 9 Python files, no code
folder more than 9 files, no module past 450 lines, no script imports a script, no import cycle."""
import ast
import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE_DIRS = ('experiments', 'metrics', 'neighbours')


def tracked():
    r = subprocess.run(['git', '-C', REPO, 'ls-files', '--cached', '--others', '--exclude-standard'],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip('not a git checkout: the layout is checked on the repository')
    return [f for f in r.stdout.split('\n') if f and os.path.exists(os.path.join(REPO, f))]


def file_map():
    """The paths in the first column of README's '## Files' table."""
    text = open(os.path.join(REPO, 'README.md')).read()
    section = text.split('\n## Files\n', 1)[1].split('\n## ', 1)[0]
    paths = set()
    for line in section.split('\n'):
        if line.startswith('| `'):
            paths |= set(re.findall(r'`([^`]+)`', line.split('|')[1]))
    return paths


def modules():
    """{module name: path} of the project's own code (top level and code folders)."""
    out = {}
    for f in tracked():
        parts = f.split('/')
        if f.endswith('.py') and (len(parts) == 1 or (len(parts) == 2 and parts[0] in CODE_DIRS)):
            out[f[:-3].replace('/', '.')] = f
    return out


def test_readme_file_map_matches_the_tree():
    named, files = file_map(), tracked()
    top = {f.split('/')[0] + ('/' if '/' in f else '') for f in files if not f.startswith('.')}
    in_dirs = {f for f in files if f.split('/')[0] in CODE_DIRS}
    expected = (top - {d + '/' for d in CODE_DIRS}) | in_dirs
    assert not expected - named, f'README file map lacks {sorted(expected - named)}'
    assert not named - expected, f'README file map names what is not in the tree: {sorted(named - expected)}'


def test_sizes():
    mods = modules()
    assert len([m for m in mods if '.' not in m]) <= 9, sorted(mods)
    for d in CODE_DIRS:
        assert len([f for f in tracked() if f.startswith(d + '/')]) <= 9, d
    long = {p: n for p in mods.values() if (n := len(open(os.path.join(REPO, p)).readlines())) > 450}
    assert not long, f'modules past 450 lines: {long}'


def test_no_script_imports_a_script_and_no_cycle():
    mods = modules()
    deps, scripts = {}, set()
    for m, p in mods.items():
        tree = ast.parse(open(os.path.join(REPO, p)).read())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names |= {node.module} | {f'{node.module}.{a.name}' for a in node.names}
            elif isinstance(node, ast.If) and '__name__' in ast.unparse(node.test):
                scripts.add(m)
        deps[m] = (names & set(mods)) - {m}
    leaning = sorted(f'{a} -> {b}' for a in deps for b in deps[a] if b in scripts)
    assert not leaning, f'modules that import a script: {leaning}'

    def reach(m, seen):
        for d in deps[m]:
            if d not in seen:
                seen.add(d)
                reach(d, seen)
        return seen
    cycles = sorted(m for m in deps if m in reach(m, set()))
    assert not cycles, f'modules on an import cycle: {cycles}'
