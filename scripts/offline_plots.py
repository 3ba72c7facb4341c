"""Write the page template of `dvc plots show/diff` with vega, vega-lite and vega-embed inlined.

DVC's default page loads those libraries from a CDN and stays blank without a network (a laptop on a
plane, a locked-down network, CI). This template holds them in one script from the
`vl-convert-python` package (`vl_convert.javascript_bundle()`, which sets `window.vegaEmbed`, `vega`
and `vegaLite`), so the page renders offline. `.dvc/config` points `plots.html_template` at the
file; `make install` writes it:

    python -m scripts.offline_plots .dvc/plots_template.html
"""

from __future__ import annotations

import argparse
from pathlib import Path


def template() -> str:
    import vl_convert
    from dvc_render.html import PAGE_HTML

    bundle = vl_convert.javascript_bundle().replace("</script", "<\\/script")
    # DVC fills `{scripts}` with CDN <script> tags: the template leaves the placeholder out
    return PAGE_HTML.replace("{scripts}", f"<script>{bundle}</script>")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="where to write the template (plots.html_template in .dvc/config)")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(template(), encoding="utf8")


if __name__ == "__main__":
    main()
