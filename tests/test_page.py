"""What the page shows, checked without a browser: the page CSS read rule by rule, with the colours
and sizes it uses resolved through gradio's default theme (the app sets no other), the tab bar, the
options the app launches with, and text that should read as plain sentences."""
import re

import pytest

gr = pytest.importorskip("gradio")

from compression.methods import METHODS  # noqa: E402
from ui import page  # noqa: E402
from ui.inspect_tab import InspectTab  # noqa: E402
from ui.runs import Run, Session  # noqa: E402

WCAG_AA = 4.5  # contrast of normal-size text, WCAG 2 level AA
NAMED = {"white": "#ffffff", "black": "#000000"}


def _rules(css: str) -> list[tuple[list[str], dict[str, str]]]:
    """(selectors, declarations) of each rule of ``css`` in order, ``!important`` dropped."""
    css = re.sub(r"/\*.*?\*/", "", css, flags=re.S)
    rules = []
    for selectors, body in re.findall(r"([^{}]+)\{([^{}]*)\}", css):
        pairs = (d.split(":", 1) for d in body.split(";") if ":" in d)
        rules.append(([s.strip() for s in selectors.split(",")],
                      {k.strip(): v.replace("!important", "").strip() for k, v in pairs}))
    return rules


def _declared(selector: str, prop: str) -> str | None:
    """What the page CSS sets ``prop`` to for exactly ``selector`` (the last rule wins)."""
    values = [decls[prop] for selectors, decls in _rules(page.CSS) if selector in selectors and prop in decls]
    return values[-1] if values else None


def _theme(theme, name: str, dark: bool) -> str:
    """A theme variable's value, references (``*neutral_800``) followed; in dark mode a variable's
    ``_dark`` variant where it has one, as gradio's generated CSS does."""
    value = f"*{name}"
    while value.startswith("*"):
        key = value[1:]
        value = getattr(theme, f"{key}_dark", None) if dark else None
        value = value or getattr(theme, key)
    return value


def _resolve(theme, value: str, dark: bool) -> str:
    """``var(--x-y)`` as the theme's ``x_y``; anything else as written."""
    var = re.fullmatch(r"var\(--([\w-]+)\)", value.strip())
    return _theme(theme, var[1].replace("-", "_"), dark) if var else value.strip()


def _px(theme, value: str, dark: bool = False) -> float:
    """A font size in px: ``14px``, ``0.9em`` (of the body text), ``var(--text-md)``, ``max(a, b)``."""
    value = _resolve(theme, value, dark)
    if value.startswith("max("):
        return max(_px(theme, part, dark) for part in value[4:-1].split(","))
    if value.endswith("em"):
        return float(value[:-2]) * _px(theme, "var(--body-text-size)", dark)
    return float(value.removesuffix("px"))


def _luminance(color: str) -> float:
    """WCAG relative luminance of ``#rrggbb`` (or a named colour)."""
    color = NAMED.get(color, color).lstrip("#")
    channels = [int(color[i:i + 2], 16) / 255 for i in (0, 2, 4)]
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def _contrast(a: str, b: str) -> float:
    hi, lo = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


@pytest.mark.parametrize("dark", [False, True], ids=["light", "dark"])
def test_progress_text_is_readable(dark):
    """The job progress line was the theme's subdued grey (#bbbbc2 on white, 1.9:1) at 12.6 px."""
    theme = gr.themes.Default()
    text = _resolve(theme, _declared(".job-text", "color"), dark)
    background = _theme(theme, "body_background_fill", dark)
    assert _contrast(text, background) >= WCAG_AA
    assert _px(theme, _declared(".job-text", "font-size")) >= 14


def test_slider_tracks_may_shrink_into_narrow_sliders():
    """Gradio's 112 px minimum track pushed a per-layer slider's track over its own max label."""
    assert _declared(".slider_input_container input[type=range]", "min-width") == "0"
    assert _declared(".slider_input_container .max_value", "flex-shrink") == "0"


@pytest.mark.parametrize("selector", [".prose th", ".prose td", ".header-cell *"])
def test_table_text_wraps_at_spaces_only(selector):
    """Headers broke inside words ("compresse/d") and numbers from their units ("473.2 M/B")."""
    assert _declared(selector, "word-break") == "normal"
    assert _declared(selector, "overflow-wrap") == "normal"


def test_numbers_in_tables_stay_on_one_line():
    """Right-aligned (number) cells of markdown tables: "473.2 MB" never splits from its unit."""
    assert _declared('.prose td[align="right"]', "white-space") == "nowrap"


def test_every_tab_is_one_tap_away_on_a_phone(tiny_folder):
    """At 390 px gradio hid Evaluate, Chat and Runs behind a "⋯" menu: the tab bar wraps instead."""
    import app

    demo = app.build_app(tiny_folder, device="cpu")
    (tabs,) = [b for b in demo.blocks.values() if isinstance(b, gr.Tabs)]
    assert tabs.overflow_behavior == "wrap"


def test_the_app_launches_with_the_page_css_and_the_missing_status_string(monkeypatch):
    """Gradio's English strings lack ``common.complete``, which its status announcer says when an event
    ends: the raw key was read out until the app supplied it."""
    import app

    launched = {}

    class Demo:
        def queue(self, **_):
            return self

        def launch(self, **kwargs):
            launched.update(kwargs)

    monkeypatch.setattr(app, "prepare_space", lambda: None)
    monkeypatch.setattr(app, "clean_leftovers", lambda: None)
    monkeypatch.setattr(app, "build_app", lambda model: Demo())
    app.main(prevent_thread_lock=True)
    assert launched["css"] == page.CSS and launched["prevent_thread_lock"] is True
    assert launched["i18n"].translations_dict["en"]["common.complete"] == "Done"


@pytest.mark.parametrize("method", list(METHODS))
def test_method_texts_are_plain_sentences(method):
    """Bold words in the middle of a method's summary read as random emphasis (and as ** in --help)."""
    m = METHODS[method]
    assert "**" not in m.summary and "**" not in m.per_layer_note


def test_inspect_summary_bolds_only_the_compressed_size():
    session = Session()
    session.add(Run("r1", "tiny", {"method": "slicegpt", "params_dense": 4_000_000, "params_compressed": 3_000_000,
                                   "ratio_target": 0.25, "ratio_achieved": 0.25, "layers": []}))
    summary = InspectTab(None).inspect(session, "r1")[2]
    assert re.findall(r"\*\*(.+?)\*\*", summary) == ["3.0M"]


def _font_faces() -> dict[int, str]:
    """{weight: font file} of the page CSS's ``@font-face`` rules for the first family of ``--font``."""
    family = _declared(".gradio-container", "--font").split(",")[0].strip().strip('"')
    faces = {}
    for selectors, decls in _rules(page.CSS):
        if selectors == ["@font-face"] and decls["font-family"].strip('"') == family:
            low, *high = (int(w) for w in decls["font-weight"].split())
            for weight in range(low, (high[0] if high else low) + 1, 100):
                faces[weight] = re.search(r'url\("([^"]+)"\)', decls["src"])[1]
    return faces


@pytest.mark.parametrize("weight", [400, 600, 700])
def test_every_weight_of_the_page_font_has_every_character(weight):
    """Bold (600/700) came from gradio's SemiBold file of 55 glyphs: "473.2 MB" set in bold showed
    "473.2 M" in a wider fallback font and "B" in the page font."""
    from pathlib import Path

    ttlib = pytest.importorskip("fontTools.ttLib")
    frontend = Path(gr.__file__).parent / "templates" / "frontend"  # where gradio serves static/ from
    font = ttlib.TTFont(frontend / _font_faces()[weight])
    assert set(map(ord, "0123456789.,%–→·×ABCMBKabcdefghijklmnopqrstuvwxyz")) <= set(font.getBestCmap())
