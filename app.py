"""SAE Transfer Explorer: `streamlit run app.py`.

Navigation only; every page picks its run with webapp.state.run_picker() (sidebar, `?run=`).
Deep link to a feature: /feature?run=demo&sae=base_sae&feature=123
"""

import streamlit as st

# No page_icon and no page icons: Streamlit fetches a material-icon favicon from
# fonts.gstatic.com, and the app must make no outbound requests.
st.set_page_config(page_title="SAE Transfer Explorer", layout="wide")

PAGES = [
    st.Page("pages/1_overview.py", title="Overview", url_path="overview", default=True),
    st.Page("pages/2_features.py", title="Features", url_path="features"),
    st.Page("pages/3_feature.py", title="Feature", url_path="feature"),
    st.Page("pages/4_dead-born.py", title="Dead & born", url_path="dead-born"),
    st.Page("pages/5_similarity.py", title="Similarity", url_path="similarity"),
    st.Page("pages/7_differences.py", title="Where the models differ", url_path="differences"),
    st.Page("pages/6_live_probe.py", title="Live probe", url_path="live_probe"),
]

pg = st.navigation(PAGES)
pg.run()
