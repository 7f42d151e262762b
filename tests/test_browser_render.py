"""The feature browser page in a real headless browser: its JavaScript builds the latent views.

Skipped unless a Chromium binary is installed (Debian: ``apt-get install chromium``).
"""

import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch
from conftest import TINY_SPECIAL_WORDS

from sae.browser import feature_browser, read_browser_data
from sae.models import SAE, SAEConfig

pytest.importorskip("transformers")
CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary found")


def chromium(tmp_path, url, *extra):
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}", *extra, url,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


class Dom(HTMLParser):
    """Elements of a DOM dump: (tag, attrs, text directly inside) in document order."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.nodes, self.stack = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        node = {"tag": tag, "attrs": dict(attrs), "text": "", "parents": list(self.stack)}
        self.nodes.append(node)
        if tag not in ("meta", "input", "br", "img", "link", "hr"):  # void elements
            self.stack.append(node)

    def handle_endtag(self, tag):
        if any(n["tag"] == tag for n in self.stack):
            while self.stack.pop()["tag"] != tag:
                pass

    def handle_data(self, data):
        if self.stack:
            self.stack[-1]["text"] += data

    def find(self, cls=None, tag=None, inside=None):
        out = []
        for n in self.nodes:
            if cls and cls not in n["attrs"].get("class", "").split():
                continue
            if tag and n["tag"] != tag:
                continue
            if inside is not None and not any(p is inside for p in n["parents"]):
                continue
            out.append(n)
        return out


def visible(s):
    return s.replace("\r", "\u240d").replace("\n", "\u21b5").replace("\t", "\u21e5")


@pytest.fixture(scope="module")
def page(tiny_llama, tiny_tokenizer, tmp_path_factory):
    tokens = torch.randint(3, 128, (10, 16), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 1
    tokens[:, 2] = 3  # "<script>alert(1)</script>"
    tokens[:, 4] = 4  # '<img src=x onerror=...>'
    tokens[:, 6] = 5  # "a\nb"
    gen = torch.Generator().manual_seed(1)
    sae = SAE(SAEConfig(d_in=32, d_sae=64, architecture="topk", k=8), generator=gen).eval()
    out = tmp_path_factory.mktemp("render") / "page.html"
    feature_browser(tiny_llama, tiny_tokenizer, sae, "model.layers.1", tokens, n_latents=12,
                    window=(6, 3), out=out)
    return out, read_browser_data(out)


def test_rendered_dom_shows_top_contexts(page, tmp_path):
    path, data = page
    entry = data["latents"][3]
    dom = Dom(chromium(tmp_path, f"{path.as_uri()}#latent-{entry['id']}", "--dump-dom"))
    (detail,) = [n for n in dom.nodes if n["attrs"].get("id") == "detail"]
    assert detail["attrs"]["data-latent"] == str(entry["id"])
    rows = dom.find(cls="ctx", inside=detail)
    want = [f"{c['c']}:{c['p']}" for c in entry["contexts"]]
    assert [r["attrs"]["data-ctx"] for r in rows] == want
    assert len(rows) == len(entry["contexts"]) > 0
    for row, c in zip(rows, entry["contexts"], strict=True):
        toks = dom.find(cls="tok", inside=row)
        assert [t["text"] for t in toks] == [visible(data["vocab"][str(i)]) for i in c["t"]]
        (peak,) = dom.find(cls="peak", inside=row)
        assert peak["text"] == visible(data["vocab"][str(c["t"][c["p"] - c["start"]])])
        assert float(peak["attrs"]["data-act"]) == c["act"]
        assert "background" in peak["attrs"].get("style", "")  # shaded by activation
        assert "activation" in peak["attrs"]["title"]  # hover shows the value
    # the index lists every latent shown, the current one marked
    index = dom.find(cls="row")
    assert [int(r["attrs"]["data-latent"]) for r in index] == [e["id"] for e in data["latents"]]
    assert [r["attrs"]["data-latent"] for r in dom.find(cls="cur")] == [str(entry["id"])]
    # logit effects are drawn
    assert len(dom.find(cls="tt", inside=detail)) == 20


def test_markup_in_tokens_stays_text(page, tmp_path):
    path, data = page
    shown = [e for e in data["latents"] if any(3 in c["t"] for c in e["contexts"])]
    assert shown
    html = chromium(tmp_path, f"{path.as_uri()}#latent-{shown[0]['id']}", "--dump-dom")
    dom = Dom(html)
    texts = [n["text"] for n in dom.find(cls="tok")]
    assert TINY_SPECIAL_WORDS[0] in texts  # shown literally, as text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    (body,) = dom.find(tag="body")
    assert not dom.find(tag="img") and "data-pwned" not in body["attrs"]  # onerror never ran
    assert "a\u21b5b" in texts or all(5 not in c["t"] for c in shown[0]["contexts"])


def test_screenshot(page, tmp_path):
    path, _ = page
    shot = tmp_path / "shot.png"
    chromium(tmp_path, path.as_uri(), f"--screenshot={shot}", "--window-size=1200,800")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
