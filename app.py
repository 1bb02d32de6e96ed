"""SAE Transfer Explorer: `streamlit run app.py`.

Navigation only; every page picks its run with webapp.state.run_picker() (sidebar, `?run=`).
Deep link to a feature: /feature?run=demo&sae=base_sae&feature=123
"""

import streamlit as st

# No page_icon and no page icons: Streamlit fetches a material-icon favicon from
# fonts.gstatic.com, and the app must make no outbound requests.
st.set_page_config(page_title="SAE Transfer Explorer", layout="wide")

OVERVIEW = "pages/1_overview.py"


def _overview_alias() -> None:
    """/overview?...: Streamlit serves the default page at "/" only, so a link to /overview on a
    warm server would get its "Page not found" dialog. This hidden page forwards it, query and
    all, to the Overview at "/" (a repeated parameter keeps its first value, as everywhere)."""
    st.switch_page(OVERVIEW, query_params={k: st.query_params.get_all(k)[0] for k in st.query_params})


PAGES = [
    # the default page is served at "/"; its own url_path only names it (it must differ from
    # the alias's), and the hidden alias answers /overview
    st.Page(OVERVIEW, title="Overview", url_path="home", default=True),
    st.Page(_overview_alias, title="Overview", url_path="overview", visibility="hidden"),
    st.Page("pages/2_features.py", title="Features", url_path="features"),
    st.Page("pages/3_feature.py", title="Feature", url_path="feature"),
    st.Page("pages/4_dead-born.py", title="Dead & born", url_path="dead-born"),
    st.Page("pages/5_similarity.py", title="Similarity", url_path="similarity"),
    st.Page("pages/8_differences.py", title="Where the models differ", url_path="differences"),
    st.Page("pages/6_live_probe.py", title="Live probe", url_path="live_probe"),
    st.Page("pages/7_crosscoder.py", title="Crosscoder", url_path="crosscoder"),
]

pg = st.navigation(PAGES)
pg.run()
