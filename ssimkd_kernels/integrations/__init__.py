"""Adapters that plug the SSIM-KD loss into other frameworks.

    ssimkd_kernels.integrations.mmdet   registers SSIMKDLoss (and the SSIMKDDistiller detector) in mmdet's
                                        MODELS registry, and in mmrazor's where mmrazor is installed

Nothing here is imported by ``import ssimkd_kernels``: each adapter is imported on its own, e.g. through an
mmengine config's ``custom_imports=dict(imports=['ssimkd_kernels.integrations.mmdet'])``.
"""
