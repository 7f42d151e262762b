"""Look at what SAE latents do: a static HTML feature browser (``sae browse``).

:func:`feature_browser` runs a language model once over token contexts, encodes the activations
at one hook point with an SAE and writes ONE self-contained HTML file (inline CSS and JavaScript,
no network requests, opens from ``file://``) in the style of sae_vis / SAEDashboard: an index of
latents (density, max activation) and per latent its top activating contexts with every token
shaded by the latent's activation, the activation histogram, its direct logit effects and where
its density sits among all latents.

* :mod:`.scan`: the pass over the tokens (statistics, streaming top contexts, logit effects);
* :mod:`.page`: :func:`feature_browser` (what is shown, the page data);
* :mod:`.render`: the HTML (template, CSS and JavaScript in ``static/``) and reading it back.
"""

from .page import feature_browser
from .render import read_browser_data
from .scan import select_latents

__all__ = ["feature_browser", "read_browser_data", "select_latents"]
