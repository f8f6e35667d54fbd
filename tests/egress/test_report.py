"""egress.report: the page's content from a real store, that it is self-contained, and that
nothing from the store becomes markup."""

from html.parser import HTMLParser

import pytest

from db import FlowFilter, Store
from egress import report
from egress.records import FINDINGS
from tests.incident import (HOSTILE, HOSTILE_TASK, TASK, replay_lab_incident,
                            write_hostile_task)

ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p",
                "code", "section", "blockquote", "dl", "dt", "dd", "table", "tr", "th", "td",
                "span", "i", "article", "footer", "svg", "line", "text", "rect", "path"}
"""Every element the report uses; none of them loads anything or runs code."""
FETCHING_ATTRIBUTES = {"src", "href", "xlink:href", "srcset", "action", "formaction", "poster",
                       "background", "data", "ping", "manifest", "codebase"}


class Page(HTMLParser):
    """The parsed page: elements with their attributes, text, and CSS."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict]] = []
        self.data: list[str] = []
        self.css: list[str] = []
        self._in_style = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        self._in_style = tag == "style"
        if "style" in dict(attrs):
            self.css.append(dict(attrs)["style"])

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        (self.css if self._in_style else self.data).append(data)

    @property
    def text(self) -> str:
        """The text chunks, a space between (cells apart, each chunk whole)."""
        return " ".join(self.data)

    def tags(self, name: str) -> list[dict]:
        return [attrs for tag, attrs in self.elements if tag == name]


def self_contained_problems(page: Page) -> list[str]:
    """What in the page could fetch something or run code (empty: nothing)."""
    problems = [f"<{tag}>" for tag, _ in page.elements if tag not in ALLOWED_TAGS]
    for tag, attrs in page.elements:
        for name in attrs:
            if name in FETCHING_ATTRIBUTES or name.startswith("on"):
                problems.append(f"<{tag} {name}=...>")
    for css in page.css:
        if "url(" in css.lower() or "@import" in css.lower():
            problems.append(f"CSS loads: {css[:60]}")
    csp = [a for a in page.tags("meta") if a.get("http-equiv") == "Content-Security-Policy"]
    if not csp or "default-src 'none'" not in csp[0].get("content", ""):
        problems.append("no content security policy forbidding loads")
    return problems


def render_task(store_url: str, task: str) -> str:
    with Store.open(store_url) as store:
        filt = FlowFilter(task=task)
        return report.render(store.task(task), store.flows(filt), store.task_events(filt),
                             store.bindings(filt), source="test")


@pytest.fixture
def incident_page(store_url):
    return render_task(replay_lab_incident(store_url), TASK)


def test_the_report_tells_the_incident(incident_page):
    page = Page(incident_page)
    text = " ".join(page.text.split())
    assert "Install Python dependencies from the package index" in text
    assert "profile pypi allow[1]" in text and "files.pythonhosted.org" in text
    for finding in ("reverse-ssh-tunnel", "mining-stratum", "mining-pool", "ssh-egress"):
        assert finding in text
        assert FINDINGS[finding].meaning in text
    # Evidence, as the detectors recorded it.
    assert "server_first_exchanges 4" in text
    assert "agent XMRig/6.21.0 (Linux x86_64) libuv/1.44.2 gcc/12.2.0" in text
    assert "Findings (6)" in text and "Destinations (5)" in text
    for destination in ("relay.example", "pool.supportxmr.com", "pypi.org", "10.99.0.1"):
        assert f"<code>{destination}</code></h3>" in incident_page  # its own table


def test_the_chart_has_a_bar_per_flow_coloured_by_verdict(incident_page):
    page = Page(incident_page)
    bars = [a for a in page.tags("rect") if "bar" in a.get("class", "").split()]
    assert len(bars) == 8
    colours = {a["class"].split()[1]: a["fill"] for a in bars}
    assert colours == {"verdict-allow": report.VERDICT_COLOUR["allow"],
                       "verdict-flag": report.VERDICT_COLOUR["flag"]}
    assert sum(a["class"] == "bar verdict-flag" for a in bars) == 2
    marks = [a for a in page.tags("path") if a.get("class") == "finding-mark"]
    assert [m["fill"] for m in marks] == [report.SEVERITY_COLOUR["critical"]] * 2
    events = [a for a in page.tags("line") if a.get("class") == "event"]
    assert len(events) == 2  # task-started, task-ended
    # Bars start where their flows start: left to right in the order the flows began.
    starts = [float(a["x"]) for a in bars]
    assert starts == sorted(starts) and starts[0] < starts[-1]


def test_the_report_fetches_nothing(incident_page):
    assert self_contained_problems(Page(incident_page)) == []


def test_the_checker_finds_what_would_fetch_or_run():
    bad = Page('<html><head><style>body{background:url("https://x.example/a.png")}</style>'
               '</head><body><img src="https://x.example/p.png"><p onclick="x()">a</p>'
               '<script>1</script></body></html>')
    assert self_contained_problems(bad) == [
        "<img>", "<script>", "<img src=...>", "<p onclick=...>",
        'CSS loads: body{background:url("https://x.example/a.png")}',
        "no content security policy forbidding loads"]


def test_store_text_is_escaped_never_markup(store_url):
    write_hostile_task(store_url)
    html = render_task(store_url, HOSTILE_TASK)
    page = Page(html)
    assert self_contained_problems(page) == []
    assert page.tags("script") == [] and page.tags("img") == [] and page.tags("iframe") == []
    text = page.text
    for value in HOSTILE.values():
        assert value in text, value     # shown as text, character for character
    assert "pid 31337" in " ".join(text.split())


def test_a_long_task_charts_every_notable_flow_and_lists_all():
    from types import SimpleNamespace

    from egress.records import Step, Verdict
    from tagging import manifest
    from tests.factories import T0, make_finding, make_flow
    many = [make_flow(start=T0 + i * 1000, end=T0 + i * 1000 + 10, verdict=Verdict.ALLOW,
                      decided_at=Step.START) for i in range(report.CHART_ROWS + 50)]
    last = make_flow(start=T0 + 10_000_000, end=T0 + 10_000_010, verdict=Verdict.FLAG,
                     decided_at=Step.START, findings=[make_finding("direct-ip")])
    task = SimpleNamespace(id="t1", purpose=manifest.parse('version = 1\npurpose = "p"\n',
                                                           "p.toml"),
                           mode="audit", sha256=None, started=T0, ended=None)
    page = Page(report.render(task, [*many, last], []))
    bars = [a for a in page.tags("rect") if "bar" in a.get("class", "")]
    assert len(bars) == report.CHART_ROWS
    assert bars[-1]["class"] == "bar verdict-flag"      # the late flagged flow is charted
    assert len(page.tags("path")) == 1
    assert f"shows {report.CHART_ROWS} of the task's {len(many) + 1} flows" in page.text
    assert sum(1 for d in page.data if d.startswith("f-t0")) >= len(many) + 1  # all listed
