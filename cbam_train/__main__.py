from cbam_train.cli.command import main

if __name__ == "__main__":
    main()
