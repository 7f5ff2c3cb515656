"""
Check a configuration file and report every problem in it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Collection

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from zope.interface import implementer

from fedhub.config import Config, exposed_password, load_config, locate_problems_in
from fedhub.errors import ConfigError, ConfigProblem, ConfigUnreadable, TemporarilyUnavailable
from fedhub.cli import runner
from fedhub.hub import (
    build_refusal,
    built_problem,
    bridge_warnings,
    certificate_warnings,
    directory_problem,
    start_problems,
)
from fedhub.interfaces import IPublisher
from fedhub.message import Message
from fedhub.plugins import PluginContext, find_plugin


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """
    Arguments of C{fedhub check-config}.
    """
    parser.add_argument("file", help="the TOML configuration file")


@implementer(IPublisher)
class _NoPublisher:
    """
    What plugins get while they are only built to be checked: it takes nothing.
    """

    def __init__(self, domain: str) -> None:
        self.domain = domain

    def publish(self, message: Message) -> Deferred[None]:
        return fail(TemporarilyUnavailable("check-config publishes nothing", message.id))


def build_problems(config: Config, domain_names: Collection[str] = ()) -> list[ConfigProblem]:
    """
    What the hub would refuse when it starts (L{start_problems}: the state
    directory's length, each domain's settings and TLS files, the files
    components read when they start; a state directory it could not use or
    make), then build every component the way the hub would (plugins do no
    I/O when built), and
    collect what their plugins refuse: problems only a plugin can see, such
    as a bridge naming an unknown domain.

    @param domain_names: Every domain the file defines, when C{config} holds
        only its valid ones (see L{ConfigError.partial}): components of an
        invalid domain are skipped, and a bridge to one is not told that
        domain is unknown.
    """
    problems = start_problems(config)
    # The hub reports an unusable state directory itself, in one line, when
    # it locks it at start; a check before then says so too.
    unusable = directory_problem(config.hub.state_dir)
    if unusable is not None:
        problems.insert(0, ConfigProblem("hub.state_dir", unusable))
    publishers = {name: _NoPublisher(name) for name in {*config.domains, *domain_names}}
    for component in config.components:
        if component.domain not in config.domains:
            continue
        plugin = find_plugin(component.kind, component.plugin)
        peers = {}
        if getattr(plugin, "crosses_domains", False) is True:
            peers = {n: p for n, p in publishers.items() if n != component.domain}
        context = PluginContext(
            name=component.name,
            domain=component.domain,
            options=component.options,
            publisher=publishers[component.domain],
            reactor=Clock(),
            hub=config.hub,
            component=component,
            peer_publishers=peers,
        )
        try:
            built = plugin.build(context)
        except ConfigError as e:
            problems.extend(e.problems)
        except Exception as e:
            problems.append(build_refusal(component, e))
        else:
            problem = built_problem(component, built)
            if problem is not None:
                problems.append(problem)
    # A plugin that refuses its options refuses them both when asked for the
    # files it reads and when built: one line is enough.
    return list(dict.fromkeys(problems))


def run(args: argparse.Namespace) -> int:
    """
    Exit 0 and summarize when the file is valid; print one line per problem
    on standard error and exit 1 when it is not.
    """
    try:
        config = load_config(args.file)
        problems = build_problems(config)
    except ConfigUnreadable as e:
        # Not read at all: nothing was checked (78, as for every command).
        return runner.fail("check-config", f"{args.file}: {e.problems[0].message}", runner.EX_CONFIG)
    except ConfigError as e:
        problems = list(e.problems)
        # What was valid is checked as far as it goes (its files, what its
        # plugins refuse): every problem at once, not one round each.
        if e.partial is not None:
            problems += build_problems(e.partial, e.defined_domains)
    if problems:
        problems = locate_problems_in(args.file, problems)
    warning = exposed_password(config) if not problems else None
    if warning is not None:
        print(f"warning: {warning}", file=sys.stderr)
    if not problems:
        for text in certificate_warnings(config) + bridge_warnings(config):
            print(f"warning: {text}", file=sys.stderr)
    if problems:
        print(f"{args.file}: {len(problems)} configuration problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(
        f"{args.file}: OK ({len(config.domains)} domain(s), {len(config.producers)} producer(s), "
        f"{len(config.consumers)} consumer(s))"
    )
    return 0
