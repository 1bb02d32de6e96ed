"""`sae-transfer app --workers 2` in Chromium: pages render through the balancer, the browser
gets the affinity cookie, and a download (kept in the memory of the worker that made it, served
at /media/...) arrives: every request of the session reached the worker that holds it."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from tests.browser_utils import streamlit_server, wait_idle

pytestmark = pytest.mark.browser


def test_two_workers_in_a_browser_keep_a_session_on_one_worker(synthetic_runs, browser):
    with streamlit_server(runs_dir=synthetic_runs, timeout=180, workers=2) as url:
        for _ in range(2):  # two browsers (contexts) in turn: each on one worker, each download found
            context = browser.new_context(viewport={"width": 1500, "height": 1100}, accept_downloads=True)
            page = context.new_page()
            try:
                page.goto(f"{url}/feature?run=synth&sae=base_sae&feature=5")
                wait_idle(page)
                assert page.get_by_text(re.compile("feature 5")).first.is_visible()
                cookies = {c["name"]: c["value"] for c in context.cookies()}
                assert cookies.get("sx_worker") in ("0", "1")
                page.goto(f"{url}/features?run=synth&sae=finetuned_sae")
                wait_idle(page)
                with page.expect_download(timeout=60000) as dl:
                    page.get_by_role("button", name=re.compile("Download the .* matching rows as CSV")).click()
                got = pd.read_csv(dl.value.path())
                feats = pd.read_parquet(synthetic_runs / "synth" / "features.parquet")
                assert got.feature_id.tolist() == feats[(feats.sae == "finetuned_sae") & (feats.cross_class != "both_dead")].sort_values("feature_id").feature_id.tolist()
            finally:
                context.close()
