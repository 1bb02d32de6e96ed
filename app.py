"""SAE Transfer Explorer: `streamlit run app.py`.

Navigation only; every page picks its run with webapp.state.run_picker() (sidebar, `?run=`).
Deep link to a feature: /feature?run=demo&sae=base_sae&feature=123
"""

import streamlit as st

st.set_page_config(page_title="SAE Transfer Explorer", page_icon=":material/compare_arrows:", layout="wide")

PAGES = [
    st.Page("pages/1_overview.py", title="Overview", icon=":material/dashboard:", url_path="overview", default=True),
    st.Page("pages/2_features.py", title="Features", icon=":material/table_rows:", url_path="features"),
    st.Page("pages/3_feature.py", title="Feature", icon=":material/search:", url_path="feature"),
    st.Page("pages/4_dead_born.py", title="Dead & born", icon=":material/skull:", url_path="dead-born"),
    st.Page("pages/5_similarity.py", title="Similarity", icon=":material/scatter_plot:", url_path="similarity"),
    st.Page("pages/6_live_probe.py", title="Live probe", icon=":material/science:", url_path="probe"),
]

pg = st.navigation(PAGES)
pg.run()
