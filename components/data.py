"""Data components: the demo data, a real dataset's download, and each dataset stage of `sqgan.data.stages`."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def demo_data(params: Input[Artifact], overrides: list, tracking_uri: str, parent_run_id: str,
              data: Output[Dataset], report: Output[Metrics]):
    """The offline demo dataset (stage `demo`: data.demo, model.resolution)."""
    from sqgan.commands.kfp_tasks import data_task, log_numbers

    r = data_task("demo", params.path, overrides, tracking_uri, parent_run_id, data.path)
    data.metadata.update(r)
    log_numbers(report, r)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def download(dataset: str, params: Input[Artifact], overrides: list, tracking_uri: str, parent_run_id: str,
             raw: Output[Dataset]):
    """A real dataset's raw files: data.<dataset>.url (verified by its sha256) or data.<dataset>.path."""
    from sqgan.commands.kfp_tasks import download_task

    raw.metadata.update(download_task(dataset, params.path, overrides, tracking_uri, parent_run_id, raw.path))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def curate(params: Input[Artifact], overrides: list, tracking_uri: str, parent_run_id: str, src: Input[Dataset],
           data: Output[Dataset], report: Output[Metrics]):
    """Stage `curate` of a folder of images (data.curate)."""
    from sqgan.commands.kfp_tasks import data_task, log_numbers

    r = data_task("curate", params.path, overrides, tracking_uri, parent_run_id, data.path, src=src.path)
    data.metadata.update(r)
    log_numbers(report, r)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ffhq2k5(params: Input[Artifact], overrides: list, tracking_uri: str, parent_run_id: str, raw: Input[Dataset],
            data: Output[Dataset], report: Output[Metrics]):
    """Stage `ffhq2k5`: FFHQ curated, BLIP features, KMeans, the smallest cluster (data.ffhq2k5)."""
    from sqgan.commands.kfp_tasks import data_task, log_numbers

    r = data_task("ffhq2k5", params.path, overrides, tracking_uri, parent_run_id, data.path, raw=raw.path)
    data.metadata.update(r)
    log_numbers(report, r)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def brecahad(params: Input[Artifact], overrides: list, tracking_uri: str, parent_run_id: str, raw: Input[Dataset],
             data: Output[Dataset], report: Output[Metrics]):
    """Stage `brecahad`: 512² crops of the slides on the stride grid (data.brecahad)."""
    from sqgan.commands.kfp_tasks import data_task, log_numbers

    r = data_task("brecahad", params.path, overrides, tracking_uri, parent_run_id, data.path, raw=raw.path)
    data.metadata.update(r)
    log_numbers(report, r)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def dogface(params: Input[Artifact], overrides: list, tracking_uri: str, parent_run_id: str, raw: Input[Dataset],
            data: Output[Dataset], report: Output[Metrics]):
    """Stage `dogface`: dog heads of Oxford-IIIT Pet, centred square crops (data.dogface)."""
    from sqgan.commands.kfp_tasks import data_task, log_numbers

    r = data_task("dogface", params.path, overrides, tracking_uri, parent_run_id, data.path, raw=raw.path)
    data.metadata.update(r)
    log_numbers(report, r)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def metfaces(params: Input[Artifact], overrides: list, tracking_uri: str, parent_run_id: str, raw: Input[Dataset],
             data: Output[Dataset], report: Output[Metrics]):
    """Stage `metfaces`: MetFaces as released, curated (data.curate)."""
    from sqgan.commands.kfp_tasks import data_task, log_numbers

    r = data_task("metfaces", params.path, overrides, tracking_uri, parent_run_id, data.path, raw=raw.path)
    data.metadata.update(r)
    log_numbers(report, r)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def fewshot100(params: Input[Artifact], overrides: list, tracking_uri: str, parent_run_id: str, raw: Input[Dataset],
               data: Output[Dataset], report: Output[Metrics]):
    """Stage `fewshot100`: one of DiffAugment's 100-shot sets, curated as released (data.fewshot100)."""
    from sqgan.commands.kfp_tasks import data_task, log_numbers

    r = data_task("fewshot100", params.path, overrides, tracking_uri, parent_run_id, data.path, raw=raw.path)
    data.metadata.update(r)
    log_numbers(report, r)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def cifar10(params: Input[Artifact], overrides: list, tracking_uri: str, parent_run_id: str, raw: Input[Dataset],
            data: Output[Dataset], report: Output[Metrics]):
    """Stage `cifar10`: the python tarball's batches → PNGs with label and the official split (data.cifar10)."""
    from sqgan.commands.kfp_tasks import data_task, log_numbers

    r = data_task("cifar10", params.path, overrides, tracking_uri, parent_run_id, data.path, raw=raw.path)
    data.metadata.update(r)
    log_numbers(report, r)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def cifar100(params: Input[Artifact], overrides: list, tracking_uri: str, parent_run_id: str, raw: Input[Dataset],
             data: Output[Dataset], report: Output[Metrics]):
    """Stage `cifar100`: as cifar10, 100 fine classes, coarse labels kept (data.cifar100)."""
    from sqgan.commands.kfp_tasks import data_task, log_numbers

    r = data_task("cifar100", params.path, overrides, tracking_uri, parent_run_id, data.path, raw=raw.path)
    data.metadata.update(r)
    log_numbers(report, r)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def subset(params: Input[Artifact], overrides: list, tracking_uri: str, parent_run_id: str, src: Input[Dataset],
           data: Output[Dataset], report: Output[Metrics]):
    """Stage `subset`: a seeded n-image few-shot subset of a curated dataset's train split (data.subset)."""
    from sqgan.commands.kfp_tasks import data_task, log_numbers

    r = data_task("subset", params.path, overrides, tracking_uri, parent_run_id, data.path, src=src.path)
    data.metadata.update(r)
    log_numbers(report, r)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def selffilter(params: Input[Artifact], overrides: list, tracking_uri: str, parent_run_id: str, src: Input[Dataset],
               data: Output[Dataset], report: Output[Metrics]):
    """Stage `selffilter`: the images a StyleGAN2 + encoder reconstruct worst, quarantined (data.selffilter)."""
    from sqgan.commands.kfp_tasks import data_task, log_numbers

    r = data_task("selffilter", params.path, overrides, tracking_uri, parent_run_id, data.path, src=src.path)
    data.metadata.update(r)
    log_numbers(report, r)


PREPARE = {"ffhq2k5": ffhq2k5, "brecahad": brecahad, "dogface": dogface, "metfaces": metfaces,
           "fewshot100": fewshot100, "cifar10": cifar10, "cifar100": cifar100}
