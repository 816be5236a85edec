"""NCSN++ on FFHQ 1024x1024, continuous VE SDE: CelebA-HQ 1024's config with the loss averaged over
dimensions, as the reference's FFHQ config has it. Point data.path at a folder of FFHQ's images."""

from configs.ve import celebahq_ncsnpp_continuous


def get_config():
  config = celebahq_ncsnpp_continuous.get_config()
  config.training.reduce_mean = True
  return config
