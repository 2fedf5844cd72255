"""``--quantize-sites`` (``CompileOptions.quantize_sites``): a block-wise scheme per site in place of
``--quantize``'s, e.g. ``attention=int8-weights,mlp=int4``. Its text form, and the checks made before
the export. The sites are those ``export/matmul_sites.py`` records in the graphs; the pass that applies
them is ``passes/matmul_nbits.py`` (``NBitsOptions.site_bits``)."""
from __future__ import annotations

from ember.errors import ConfigError
from ember.passes.matmul_nbits import MIXED_SITES, SCHEMES


def parse_sites(text: str) -> dict[str, str]:
    """The ``--quantize-sites`` value ``SITE=SCHEME[,SITE=SCHEME]`` as a dict (checked by ``check_sites``)."""
    sites: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        site, eq, scheme = (s.strip() for s in item.partition("="))
        if not eq or not site or not scheme:
            raise ConfigError(f"--quantize-sites {text!r}: {item!r} is not SITE=SCHEME "
                              f"(e.g. attention=int8-weights,mlp=int4)")
        if site in sites:
            raise ConfigError(f"--quantize-sites {text!r}: site {site!r} is given twice")
        sites[site] = scheme
    if not sites:
        raise ConfigError(f"--quantize-sites {text!r} names no site; e.g. --quantize-sites attention=int8-weights")
    return sites


def format_sites(sites: dict[str, str]) -> str:
    """``sites`` as the ``--quantize-sites`` value that gives it, e.g. ``attention=int8-weights,mlp=int4``."""
    return ",".join(f"{site}={scheme}" for site, scheme in sites.items())


def weight_schemes(quantize: str | None, sites: dict[str, str], quantize_lm_head: bool) -> set[str]:
    """The schemes the weight MatMuls get: each site's (``sites``, else ``quantize``) and the LM head's
    with ``quantize_lm_head``; "float" where a site stays float."""
    if not quantize:
        return set()
    lm_head = {quantize} if quantize_lm_head else set()
    return {sites.get(site, quantize) for site in MIXED_SITES} | lm_head


def check_sites(sites: dict[str, str], quantize: str | None, quantize_lm_head: bool) -> None:
    """Every site known, every scheme known, and some weight left to quantize (whether ``quantize`` is
    block-wise is ``CompileOptions``' check)."""
    if not isinstance(sites, dict):
        raise ConfigError(f"quantize_sites must be a dict of site -> scheme, not {type(sites).__name__}")
    for site, scheme in sites.items():
        if site not in MIXED_SITES:
            raise ConfigError(f"--quantize-sites {site}={scheme}: site {site!r} is not one of {', '.join(MIXED_SITES)} "
                              f"(the LM head: --quantize-lm-head)")
        if scheme not in SCHEMES.values():
            raise ConfigError(f"--quantize-sites {site}={scheme}: scheme {scheme!r} is not one of "
                              f"{', '.join(SCHEMES.values())}")
    if sites and weight_schemes(quantize, sites, quantize_lm_head) == {"float"}:
        raise ConfigError(f"--quantize-sites {format_sites(sites)} keeps every weight float; compile without --quantize")
