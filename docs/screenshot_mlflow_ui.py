"""The README's picture of the MLflow UI: a search's parent run opened on its nested trials,
taken with headless Chromium.

Needs Playwright (`pip install playwright`, in any virtualenv) and a Chromium on the machine
(Debian: `apt-get install chromium`); no browser download. Usage:

    python docs/screenshot_mlflow_ui.py --server http://127.0.0.1:5000 --experiment quickstart \\
        --out docs/mlflow_search.png
"""

from __future__ import annotations

import argparse
import json
import shutil
import urllib.parse
import urllib.request

from playwright.sync_api import sync_playwright

# Columns toggled: off, the empty attribute columns; on, the search metric and the sampled
# parameters of each trial.
COLUMNS = (
    *("Dataset", "Source", "Models"),
    *("val_neg_elbo", "val_kl", "model.latent_dim", "model.channels", "train.beta", "train.lr"),
)


def experiment_id(server: str, name: str) -> str:
    query = urllib.parse.urlencode({"experiment_name": name})
    url = f"{server}/api/2.0/mlflow/experiments/get-by-name?{query}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)["experiment"]["experiment_id"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args()
    url = f"{args.server}/#/experiments/{experiment_id(args.server, args.experiment)}/runs"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 460})
        page.goto(url)
        page.wait_for_selector("text=Run Name", timeout=30_000)
        page.get_by_role("button", name="Close").last.click()  # the assistant side panel
        page.get_by_role("button", name="Toggle sidebar").click()
        page.get_by_role("button", name="Columns").click()
        for column in COLUMNS:
            page.get_by_text(column, exact=True).last.click()
        page.keyboard.press("Escape")
        page.locator("button[data-component-id*='runnamecellrenderer']").first.click()  # trials
        page.wait_for_selector("text=trial_", timeout=10_000)
        page.wait_for_timeout(1_000)
        page.screenshot(path=args.out)
        browser.close()


if __name__ == "__main__":
    main()
