# medvit workflow: one study config -> manifests -> patient-level splits -> training ->
# predictions -> patient-level evaluation -> HTML report, all under <results_dir>/<study>/.
#
#   snakemake --profile workflows/profiles/local                        # the demo study
#   snakemake --profile workflows/profiles/local --configfile workflows/studies/pneumonia.yaml
#
# Every rule is one `medvit <stage>` call; workflows/README.md describes the rules and
# outputs, docs/config.md every study key.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "workflows/studies/demo.yaml"


# `snakemake --report report.zip` after a run: Snakemake's own report with the key figures.
report: "workflows/report/workflow.rst"


# Loads the study file with medvit.config (all errors at once, naming key, value and what is
# allowed) and replaces `config` with the validated, default-filled study.
include: "workflows/rules/common.smk"


# The same schema through Snakemake's own validator: the workflow and the stages agree.
validate(config, "workflows/schemas/study.schema.yaml", set_default=True)


include: "workflows/rules/stages.smk"
include: "workflows/rules/data.smk"
include: "workflows/rules/cache.smk"
include: "workflows/rules/train.smk"
include: "workflows/rules/xray.smk"
include: "workflows/rules/dvpt.smk"
include: "workflows/rules/brain.smk"
include: "workflows/rules/prostate.smk"
include: "workflows/rules/histo.smk"
include: "workflows/rules/infer.smk"
include: "workflows/rules/report.smk"


# Every model's metrics are targets too, not only inputs of the report: a deleted model
# folder is then rebuilt (train -> predict -> evaluate -> report) while the other models stay.
rule all:
    default_target: True
    input:
        f"{OUT}/report/index.html",
        all_metrics(),
        EXTRA_TARGETS,
