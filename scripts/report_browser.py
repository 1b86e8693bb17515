"""Opens an HTML report of `verify --format html` in headless Chromium (the
system's, driven by Playwright) and says what a person would see: whether
it loaded without a console error or any network request, how many stage
rows the tree has, which failures show a channel strip and a hint. Used by
tests/python/test_report_html.py and scripts/demo-report.

    python scripts/report_browser.py REPORT.html [--screenshot PNG] [--no-script]
"""

import argparse
import json
import shutil
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def look(report, screenshot=None, script=True):
    """What the page shows, as a dict."""
    from playwright.sync_api import sync_playwright

    report = Path(report).resolve()
    seen = {"console": [], "requests": []}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(java_script_enabled=script, viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.on("console", lambda message: seen["console"].append(f"{message.type}: {message.text}"))
        page.on("pageerror", lambda error: seen["console"].append(f"pageerror: {error}"))
        page.on("request", lambda request: seen["requests"].append(request.url))
        page.goto(report.as_uri(), wait_until="load")
        seen["other_requests"] = [url for url in seen["requests"] if url != report.as_uri()]
        seen["errors"] = [line for line in seen["console"] if line.startswith(("error", "pageerror"))]
        seen["title"] = page.title()
        seen["tree_rows"] = page.locator("#tree .stage").count()
        seen["table_rows"] = page.locator("#stages tbody tr").count()
        seen["failures"] = page.locator("#failures article").evaluate_all(
            "articles => articles.map(a => ({id: a.id, "
            "channels: Number((a.querySelector('.strip svg') || {dataset: {}}).dataset.channels || 0), "
            "drawn: ((a.querySelector('.strip path') || {getAttribute: () => ''}).getAttribute('d') || '').length, "
            "hints: a.querySelectorAll('.hint').length, "
            "worst: a.querySelectorAll('table.worst tbody tr').length}))")
        seen["summary"] = page.locator("#summary").inner_text()
        seen["plot"] = page.locator("#plot svg").count()
        if script:
            # The table filters: only failing stages, then all again.
            page.select_option("#filter-verdict", "fail")
            seen["visible_when_failing"] = page.locator("#stages tbody tr:visible").count()
            page.select_option("#filter-verdict", "")
        if screenshot:
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=False)
        browser.close()
    return seen


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report")
    parser.add_argument("--screenshot")
    parser.add_argument("--no-script", action="store_true")
    args = parser.parse_args()
    print(json.dumps(look(args.report, args.screenshot, not args.no_script), indent=1))


if __name__ == "__main__":
    main()
