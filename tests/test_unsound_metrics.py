"""Logger metrics of a variant that is not a certificate (the unallocated sample-wise radii) are marked unsound."""
from ssmooth.lit.logging import certification_metrics


def variant(acr, sound):
    return {"certified_accuracy": [0.5, 0.25], "acr": acr, "abstain_rate": 0.1, "sound": sound}


def test_unsound_variants_go_under_unsound():
    summary = {"main": "samplewise_fill", "radii": [0.0, 0.5],
               "variants": {"samplewise_fill": variant(0.3, True), "constant": variant(0.2, True),
                            "samplewise_raw": variant(0.4, False), "published": variant(0.1, None)}}
    metrics = certification_metrics(summary, prefix="final")
    assert metrics["final/acr"] == 0.3 and metrics["final/constant/acr"] == 0.2
    assert metrics["unsound/final/samplewise_raw/acr"] == 0.4
    assert metrics["unsound/final/samplewise_raw/acc@0.5"] == 0.25
    assert not any(k.startswith("final/samplewise_raw") for k in metrics)
    assert metrics["final/published/acr"] == 0.1  # soundness not recorded: not marked unsound
